#!/usr/bin/env bash
# Regenerates the table in BENCHMARKS.md.
#
# Runs each figure's command with the release binary, saves the raw output
# under bench/results/<YYYY-MM-DD>-<short commit>/ (with meta.json: machine,
# date, commit and the command behind each file), then rewrites BENCHMARKS.md
# from those outputs. Reliability runs (long fuzz runs, the server soak) are
# not run here; their scripts save a README under
# bench/results/<date>-<commit>-reliability-<what>/, whose tables the
# rewritten file's Reliability section shows.
#
# Usage: bench/run.sh [--only FIGURE]... [--from PATH]... [--machine TEXT]
#   --only FIGURE   run (or, with --from, tabulate) only this figure; repeatable:
#                   attention  CPU attention per layer at 96k, llama3.1-8b shape,
#                              the default policy beside MagicPIG's lsh:k=10,l=150
#                   decode96k  decode step at 96k, llama3.1-8b shape (~20 GB, minutes),
#                              the default policy on int8 and bf16 stores, and on the
#                              ma-pairs layout
#                   smollm2    SmolLM2 decode at depth 0 and 8192 (and llama.cpp
#                              when LLAMA_BENCH points at llama-bench)
#                   gemma3     Gemma 3 270M decode at depth 32768, its prefill real
#                              (and llama.cpp when LLAMA_BENCH is set; ~20 minutes)
#                   gemma3-quality  Gemma 3 at 8k, 16k and 32k: the default policy and
#                              window-only on its global layers against dense (~1 hour)
#                   quality    eval on SmolLM2 at 4096: top-1, KL, needles vs dense
#                   policies   eval at 4096 of the threshold policy, MixAttention's
#                              layouts and sliding windows (~30 minutes)
#                   quant      the quantized stores on SmolLM2 at 4096 and 8192:
#                              tandem calibrate (KVTuner) at 4 and 3.25 mean bits,
#                              then eval of the default policy over bf16, K8V8,
#                              K8V4, K4V4, K4V2, K2V2 and both calibrated files
#                              (~45 minutes)
#                   fidelity   eval of the default policy vs dense at 2048, 4096
#                              and 8192: top-1, KL, single and multi-key needles,
#                              document questions (~40 minutes)
#   --from PATH     run nothing: rebuild the table from saved outputs, a run
#                   directory of this script or single saved files (repeatable)
#   --current       --from each output `bench/current` lists (one path a line):
#                   the outputs behind BENCHMARKS.md as it stands
#   --machine TEXT  the machine to name for saved files without a meta.json
# The table holds the figures of the outputs read: after a run with --only, or
# to combine runs, rebuild it with --from over the run directories wanted.
# Env: LLAMA_BENCH (llama-bench binary), THREADS (default 2), TANDEM_BIN
# (default ${CARGO_TARGET_DIR:-target}/release/tandem, built when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

ONLY=()
FROM=()
MACHINE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY+=("$2"); shift 2 ;;
    --from) FROM+=("$2"); shift 2 ;;
    --current)
      while read -r path; do
        case "$path" in ''|'#'*) ;; *) FROM+=("$path") ;; esac
      done < bench/current
      shift ;;
    --machine) MACHINE="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for f in "${ONLY[@]}"; do
  case "$f" in attention|decode96k|smollm2|gemma3|gemma3-quality|quality|policies|quant|fidelity) ;; *)
    echo "run.sh: --only takes attention, decode96k, smollm2, gemma3, gemma3-quality, quality, policies, quant or fidelity, not $f" >&2; exit 2 ;;
  esac
done
wanted() { [ ${#ONLY[@]} -eq 0 ] || printf '%s\n' "${ONLY[@]}" | grep -qx "$1"; }

THREADS=${THREADS:-2}
SMOLLM2=models/SmolLM2-135M-Instruct.Q4_1.gguf
GEMMA3=models/gemma-3-270m-q4_k_m.gguf
DEFAULT_POLICY=lsh:k=10,l=75,t=2,top=128,per=32

if [ ${#FROM[@]} -eq 0 ]; then
  BIN=${TANDEM_BIN:-${CARGO_TARGET_DIR:-target}/release/tandem}
  [ -x "$BIN" ] || cargo build --release
  DATE=$(date -u +%F)
  COMMIT=$(git rev-parse --short HEAD)
  DIR=bench/results/$DATE-$COMMIT
  mkdir -p "$DIR"
  MACHINE_NOW="$(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(nproc) cores"
  CMDS="$DIR/commands.tsv"
  : > "$CMDS"
  # run FILE CMD...: runs CMD with stdout to $DIR/FILE and records it.
  run() {
    local file=$1; shift
    printf '%s\t%s\n' "$file" "$*" >> "$CMDS"
    echo "run.sh: $* > $DIR/$file" >&2
    "$@" > "$DIR/$file"
  }
  if wanted attention; then
    run attention.json "$BIN" bench attention --context 98304 --shape llama3.1-8b \
      --policy "$DEFAULT_POLICY" "$DEFAULT_POLICY,kbits=8,vbits=8" "$DEFAULT_POLICY,kbits=4,vbits=4" \
      "$DEFAULT_POLICY,kbits=4,vbits=2" lsh:k=10,l=150 lsh:k=10,l=150,kbits=8,vbits=8 \
      lsh:k=10,l=150,kbits=4,vbits=4 threshold:eps=0.01 dense dense:kbits=4,vbits=4 --json
  fi
  if wanted decode96k; then
    for p in "$DEFAULT_POLICY,kbits=8,vbits=8" "$DEFAULT_POLICY" "$DEFAULT_POLICY,kbits=4,vbits=4"; do
      run "decode96k-$(echo "$p" | tr ':=,' '---').json" "$BIN" bench decode --shape llama3.1-8b \
        --context 98304 --tokens 12 --threads 2 --cpu-workers 2 --policy "$p" --json
    done
    # MixAttention's layout: global layers split, the rest sliding windows or shared.
    run decode96k-ma-pairs.json "$BIN" bench decode --shape llama3.1-8b --context 98304 \
      --tokens 12 --threads 2 --cpu-workers 2 --layout ma-pairs \
      --policy "$DEFAULT_POLICY,kbits=8,vbits=8" --json
  fi
  if wanted smollm2; then
    run smollm2-tandem.json "$BIN" bench decode --context 0,8192 \
      --threads "$THREADS" --cpu-workers "$THREADS" --json
    if [ -n "${LLAMA_BENCH:-}" ]; then
      THREADS=$THREADS run smollm2-llamacpp.txt bench/llamacpp.sh "$SMOLLM2" 0,8192
    else
      echo "run.sh: LLAMA_BENCH is not set: no llama.cpp figures" >&2
    fi
  fi
  if wanted gemma3; then
    run gemma3-tandem.json "$BIN" bench decode --model "$GEMMA3" --context 32768 \
      --prefill-max 32768 --tokens 32 --threads "$THREADS" --cpu-workers "$THREADS" --json
    if [ -n "${LLAMA_BENCH:-}" ]; then
      THREADS=$THREADS REPS=1 run gemma3-llamacpp.txt bench/llamacpp.sh "$GEMMA3" 32768
    else
      echo "run.sh: LLAMA_BENCH is not set: no llama.cpp figures" >&2
    fi
  fi
  if wanted gemma3-quality; then
    # A base model: the needle prompts are completions (no chat template).
    for ctx in 8192,16384 32768; do
      cases=3; [ "$ctx" = 32768 ] && cases=2
      args="--model $GEMMA3 --policy $DEFAULT_POLICY window --threads 2 --context $ctx"
      args="$args --scored 128 --needle-cases $cases --needle-tasks single,multikey"
      file="gemma3-quality-${ctx%%,*}.json"
      printf '%s\t%s\n' "$file" "$BIN eval $args --json $DIR/$file" >> "$CMDS"
      # shellcheck disable=SC2086
      "$BIN" eval $args --json "$DIR/$file" > "$DIR/${file%.json}.txt"
    done
  fi
  if wanted quality; then
    printf '%s\t%s\n' quality.json "$BIN eval --policy lsh:k=10,l=150,t=2 --context 4096 --json $DIR/quality.json" >> "$CMDS"
    "$BIN" eval --policy lsh:k=10,l=150,t=2 --context 4096 --json "$DIR/quality.json" > "$DIR/quality.txt"
  fi
  if wanted policies; then
    # quality-eval FILE NEEDLES ARGS...: eval at 4096 with ARGS, the rows to FILE.json.
    quality_eval() {
      local file=$1 needles=$2; shift 2
      local args="$* --context 4096 --threads 2 --needle-cases $needles"
      printf '%s\t%s\n' "$file.json" "$BIN eval $args --json $DIR/$file.json" >> "$CMDS"
      # shellcheck disable=SC2086
      "$BIN" eval $args --json "$DIR/$file.json" > "$DIR/$file.txt"
    }
    quality_eval policies-threshold 10 --policy threshold:eps=0.01 threshold:eps=0.1 \
      threshold:eps=0.5 lsh:k=10,l=150 topk:k=64
    for layout in ma-pairs ma-offset one-in-six; do
      quality_eval "policies-$layout" 5 --layout "$layout" --policy exact lsh:k=10,l=150
    done
    quality_eval policies-sliding 5 --policy window:w=1024 window:w=2048
  fi
  if wanted quant; then
    for bits in 4 3.25; do
      run "calibrate-$bits.txt" "$BIN" calibrate --context 4096 --budget-bits "$bits" \
        --threads 2 --out "$DIR/calibrated-$bits.toml"
    done
    P=$DEFAULT_POLICY
    args="--policy $P $P,kbits=8,vbits=8 $P,kbits=8,vbits=4 $P,kbits=4,vbits=4 $P,kbits=4,vbits=2"
    args="$args $P,kbits=2,vbits=2 $DIR/calibrated-4.toml $DIR/calibrated-3.25.toml"
    args="$args --threads 2 --context 4096,8192 --scored 128 --needle-cases 5"
    printf '%s\t%s\n' quant.json "$BIN eval $args --json $DIR/quant.json" >> "$CMDS"
    # shellcheck disable=SC2086
    "$BIN" eval $args --json "$DIR/quant.json" > "$DIR/quant.txt"
  fi
  if wanted fidelity; then
    args="--policy $DEFAULT_POLICY --threads 2 --context 2048,4096,8192 --scored 256"
    args="$args --needle-cases 10 --needle-tasks single,multikey --doc-qa"
    printf '%s\t%s\n' fidelity.json "$BIN eval $args --doc-qa-json $DIR/fidelity-docqa.json --json $DIR/fidelity.json" >> "$CMDS"
    printf '%s\t%s\n' fidelity-docqa.json "(written by the fidelity.json command)" >> "$CMDS"
    # shellcheck disable=SC2086
    "$BIN" eval $args --doc-qa-json "$DIR/fidelity-docqa.json" --json "$DIR/fidelity.json" \
      > "$DIR/fidelity.txt"
  fi
  python3 - "$DIR/meta.json" "$MACHINE_NOW" "$DATE" "$COMMIT" "$CMDS" <<'PY'
import json, sys
out, machine, date, commit, cmds = sys.argv[1:]
commands = dict(l.rstrip("\n").split("\t", 1) for l in open(cmds) if "\t" in l)
json.dump({"machine": machine, "date": date, "commit": commit, "commands": commands},
          open(out, "w"), indent=1)
PY
  rm -f "$CMDS"
  FROM=("$DIR")
fi

ONLY_LIST=$(IFS=,; echo "${ONLY[*]:-}")
python3 - "$MACHINE" "$ONLY_LIST" "${FROM[@]}" <<'PY'
"""Builds BENCHMARKS.md from saved outputs.

Each output is recognised by its fields, so files of this script's run
directories and older single files are read alike:
  bench attention --json  (bench/src/attention.rs AttentionBenchResult): dense_ms
  bench decode --json     (bench/src/decode.rs DecodeBenchResult): ms_per_token
  eval --json             (bench/src/eval/report.rs Row): top1_agreement
  llama-bench markdown    (bench/llamacpp.sh): a table with a t/s column
A run directory's meta.json gives machine, date, commit and commands (and,
as "untabled", outputs to leave out of the table); other
files take date and commit from a name ending in -YYYY-MM-DD-<commit>.
"""
import json, os, re, sys

machine_arg, only_arg, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
only = set(filter(None, only_arg.split(",")))
SMOLLM2 = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
# What each figure's rows come from when a file has no recorded command.
CANON = {
    "attention": "tandem bench attention --context 98304 --shape llama3.1-8b --policy "
                 "lsh:k=10,l=150 lsh:k=10,l=150,kbits=8,vbits=8 threshold:eps=0.01 dense --json",
    "decode96k": "tandem bench decode --shape llama3.1-8b --context 98304 --tokens 12 "
                 "--threads 2 --cpu-workers 2 --policy {policy} --json",
    "smollm2": "tandem bench decode --context 0,8192 --threads 2 --cpu-workers 2 --json",
    "llamacpp": f"bench/llamacpp.sh {SMOLLM2} 0,8192",
    "quality": "tandem eval --policy lsh:k=10,l=150,t=2 --context 4096 --json F",
}

files = []
for p in paths:
    if os.path.isdir(p):
        # A run's meta.json may keep some outputs out of the table ("untabled":
        # a side experiment, or a run too short to stand as a figure).
        meta_path = os.path.join(p, "meta.json")
        untabled = set(json.load(open(meta_path)).get("untabled", [])) \
            if os.path.exists(meta_path) else set()
        files += [os.path.join(p, f) for f in sorted(os.listdir(p))
                  if f != "meta.json" and f not in untabled]
    else:
        files.append(p)


def provenance(path):
    meta_path = os.path.join(os.path.dirname(path), "meta.json")
    if os.path.exists(meta_path):
        m = json.load(open(meta_path))
        cmd = m.get("commands", {}).get(os.path.basename(path))
        return m["machine"], m["date"], m["commit"], cmd, True
    m = re.search(r"-(\d{4}-\d\d-\d\d)-([0-9a-f]{7,40})\.[a-z]+$", path)
    date, commit = (m.group(1), m.group(2)) if m else ("?", "?")
    return machine_arg or "not recorded", date, commit, None, False


def records(text):
    text = text.strip()
    try:
        d = json.loads(text)
        return d if isinstance(d, list) else [d]
    except ValueError:
        out = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out


def model_label(name):
    """The model a record names, as the table's figures name it."""
    name = (name or "").lower()
    if "gemma" in name:
        return "Gemma 3 270M"
    return "SmolLM2-135M"


def llama_rows(text):
    """(model, depth, tokens/s, fa) of each llama-bench decode (tgN) row."""
    header, rows = None, []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "t/s" in cells:
            header = cells
            continue
        if header is None or set(cells[0]) <= set("-: "):
            continue
        r = dict(zip(header, cells))
        m = re.match(r"tg\d+(?: @ d(\d+))?$", r.get("test", ""))
        if m:
            tps = float(r["t/s"].split("±")[0])
            rows.append((model_label(r.get("model")), int(m.group(1) or 0), tps,
                         r.get("fa", "")))
    return rows


table, sources = [], []
smollm2 = {}   # (model, depth) -> [(record, value text, command, provenance)]
llamacpp = {}  # (model, depth) -> (tokens/s, fa, command, provenance), the faster setting


def row(figure, value, cmd, prov):
    machine, date, commit, _, _ = prov
    table.append((figure, value, f"`{cmd}`", machine, date, commit))


def pct(x):
    return f"{100 * x:.1f}%"


def want(fig):
    return not only or fig in only


for path in files:
    text = open(path, errors="replace").read()
    prov = provenance(path)
    cmd = prov[3]
    recs = records(text)
    used = False
    att = [r for r in recs if "dense_ms" in r and "retrieval_ms" in r]
    dec = [r for r in recs if "ms_per_token" in r and "device_ms_per_token" in r]
    qual = [r for r in recs if "top1_agreement" in r]
    docqa = [r for r in recs if "dense_correct" in r]
    llama = llama_rows(text)
    if att and want("attention"):
        for r in att:
            if r["policy"] == "dense":
                continue
            ms = r["retrieval_ms"] + r["attention_ms"]
            row(f"CPU attention, 96k, {r['shape']} shape, `{r['policy']}`: ms per layer",
                f"{ms:.2f} ms (retrieval {r['retrieval_ms']:.2f}); keys touched "
                f"{pct(r['keys_touched_fraction'])}"
                + (f", blocks scanned {pct(r['blocks_scanned_fraction'])}"
                   if "blocks_scanned_fraction" in r else "")
                + f"; dense {r['dense_ms']:.2f} ms "
                f"({r['dense_ms'] / ms:.1f}× faster)",
                cmd or CANON["attention"], prov)
        used = True
    if dec:
        # Each policy's record is followed by dense at the same context.
        pairs = []
        for i, r in enumerate(dec):
            if r["policy"] == "dense":
                continue
            dense = next((d for d in dec[i + 1:] if d["policy"] == "dense"
                          and d["context"] == r["context"]), None)
            pairs.append((r, dense))
        long = [(r, d) for r, d in pairs if r["context"] >= 65536]
        short = [(r, d) for r, d in pairs if r["context"] < 65536]
        if long and want("decode96k"):
            for r, d in long:
                v = (f"{r['ms_per_token']:.1f} ms/step (device {r['device_ms_per_token']:.1f}, "
                     f"CPU side {r['cpu_attention_ms_per_token']:.1f}"
                     + (f", median {sorted(r['step_cpu_attention_ms'])[len(r['step_cpu_attention_ms']) // 2]:.1f}"
                        if r.get("step_cpu_attention_ms") else "")
                     + (f", its CPU time {r['cpu_attention_on_cpu_ms_per_token']:.1f}"
                        if "cpu_attention_on_cpu_ms_per_token" in r else "")
                     + "); KV bytes per token "
                     f"{r['device_bytes_per_token']:.0f} device + {r['cpu_bytes_per_token']:.0f} CPU")
                if d:
                    v += (f"; dense {d['ms_per_token']:.1f} ms/step, "
                          f"{d['device_bytes_per_token']:.0f} B/token "
                          f"({d['ms_per_token'] / r['ms_per_token']:.2f}× faster)")
                kv = ", generated KV" if r.get("synthetic_kv") else ""
                row(f"Decode step, 96k, llama3.1-8b shape{kv}, `{r['policy']}`",
                    v, cmd or CANON["decode96k"].format(policy=r["policy"]), prov)
            used = True
        if short and (want("smollm2") or want("gemma3")):
            for r, d in short:
                for x, base in ((r, d), (d, None)):
                    if x is None:
                        continue
                    v = f"{x['tokens_per_s']:.1f} tokens/s ({x['ms_per_token']:.2f} ms/step)"
                    if base:
                        v += (f"; dense {base['tokens_per_s']:.1f} tokens/s "
                              f"({x['tokens_per_s'] / base['tokens_per_s']:.2f}×)")
                    key = (model_label(x.get("model")), x["context"])
                    smollm2.setdefault(key, []).append((x, v, cmd, prov))
            used = True
    if llama and (want("smollm2") or want("gemma3")):
        for model, depth, tps, fa in llama:
            best = llamacpp.get((model, depth))
            if best is None or tps > best[0]:
                llamacpp[(model, depth)] = (tps, fa, cmd, prov)
        used = True
    if qual and (want("quality") or want("policies") or want("fidelity")
                 or want("gemma3-quality") or want("quant")):
        for r in qual:
            if r["policy"] == "dense":
                continue
            needles = ""
            tasks = r.get("needles") or []
            if tasks:
                needles = "; needles " + ", ".join(
                    f"{t['task']} {pct(t['accuracy'])} (dense {pct(t['dense_accuracy'])})"
                    for t in tasks)
            elif r.get("needle_accuracy") is not None:
                needles = (f"; needles {pct(r['needle_accuracy'])} "
                           f"(dense {pct(r['dense_needle_accuracy'])})")
            bound = re.search(r"--fidelity-check (\S+)", cmd or "")
            check = f", fidelity check {bound.group(1)}" if bound else ""
            row(f"Quality, {model_label(r.get('model'))} at {r['context']}, "
                f"`{r['policy']}`{check} vs dense",
                f"top-1 agreement {pct(r['top1_agreement'])}; mean KL {r['mean_kl']:.4f} "
                f"(max {r['max_kl']:.3f}){needles}; keys touched "
                f"{pct(r['keys_touched_fraction'])}"
                + (f" (offloaded keys {pct(r['offloaded_touched_fraction'])})"
                   if r.get("offloaded_touched_fraction") else "")
                + (f", blocks scanned {pct(r['blocks_scanned_fraction'])}"
                   if r.get("blocks_scanned_fraction") else "")
                + f"; ppl {r['ppl']:.2f} (dense {r['dense_ppl']:.2f}); KV bytes per token "
                f"{r['device_bytes_per_token']:.0f} device + {r['cpu_bytes_per_token']:.0f} CPU",
                cmd or CANON["quality"], prov)
        used = True
    if docqa and want("fidelity"):
        for r in docqa:
            right = sum(r["correct"])
            dense = sum(r["dense_correct"])
            n = len(r["correct"])
            row(f"Quality, SmolLM2-135M, document questions, `{r['policy']}` vs dense",
                f"{right}/{n} answered (dense {dense}/{n}); "
                f"{sum(a and not b for a, b in zip(r['correct'], r['dense_correct']))} right where dense is wrong, "
                f"{sum(b and not a for a, b in zip(r['correct'], r['dense_correct']))} wrong where dense is right",
                cmd or "tandem eval --doc-qa", prov)
        used = True
    if used:
        sources.append((path, prov[4]))

# Real-model decode rows, each also against llama.cpp at the same depth.
for model, depth in sorted(smollm2):
    for x, v, cmd, prov in smollm2[(model, depth)]:
        if (model, depth) in llamacpp:
            tps, fa, lcmd, _ = llamacpp[(model, depth)]
            fa = f", fa {fa}" if fa else ""
            v += (f"; llama.cpp {tps:.1f} tokens/s{fa} "
                  f"({x['tokens_per_s'] / tps:.2f}×)")
        kv = ", generated KV" if x.get("synthetic_kv") else ""
        row(f"{model} decode at depth {depth}{kv}, `{x['policy']}`",
            v, cmd or CANON["smollm2"], prov)
for model, depth in sorted(set(llamacpp) - set(smollm2)):
    tps, fa, cmd, prov = llamacpp[(model, depth)]
    row(f"llama.cpp {model} decode at depth {depth}", f"{tps:.1f} tokens/s",
        cmd or CANON["llamacpp"], prov)

order = ["CPU attention", "Decode step", "SmolLM2", "Gemma", "llama.cpp", "Quality"]
table.sort(key=lambda r: next(i for i, o in enumerate(order) if r[0].startswith(o)))
if not table:
    sys.exit("run.sh: no benchmark outputs recognised in " + " ".join(paths))

commits = sorted({r[5] for r in table})
out = ["# Benchmarks", "",
       "The current figures. `bench/run.sh` regenerates this file: it runs each command "
       "with the release binary, saves the raw outputs under "
       "`bench/results/<date>-<commit>/` and rewrites the table "
       "(`bench/run.sh --help` for running a subset, or for rebuilding the table from "
       "saved outputs with `--from`; `bench/run.sh --current` rebuilds it from the "
       "outputs `bench/current` lists). Past runs and their discussion are in "
       "`bench/results/` (`*-history.md`); a change measured against the commit "
       "before it, the two binaries alternated with `bench/ab.sh`, is in "
       "`bench/results/<date>-<new>-vs-<old>/` with a README of its figures.", "",
       "Ratios compare with the baseline measured in the same command: dense, or "
       "llama.cpp for the SmolLM2 decode rows.", ""]
machines = sorted({r[3] for r in table})
if len(machines) > 1:
    out += ["The rows come from " + str(len(machines)) + " machines (" +
            "; ".join(machines) + "), named in the Machine column: compare figures "
            "only between rows of one machine. A row of an older machine stands until "
            "its command runs again on the newer one.", ""]
legacy = [p for p, has_meta in sources if not has_meta]
if legacy:
    out += ["Built from saved outputs of commit(s) " + ", ".join(commits) + ", "
            "which predate `bench/run.sh`: their runs used the history's settings, "
            "which may differ from the commands shown (policies, token counts, "
            "threads); the command column is what `bench/run.sh` runs. Sources: "
            + ", ".join(f"`{p}`" for p in legacy) + ".", ""]
out += ["| Figure | Value | Command | Machine | Date | Commit |",
        "| --- | --- | --- | --- | --- | --- |"]
out += ["| " + " | ".join(r) + " |" for r in table]
# Runs read whose directory holds a README: their own tables, verbatim.
runs = [p for p in paths if os.path.isdir(p) and os.path.exists(os.path.join(p, "README.md"))]
for run_dir in runs:
    readme = os.path.join(run_dir, "README.md")
    lines = open(readme).read().splitlines()
    out += ["", "## " + lines[0].lstrip("# ").strip(), "",
            f"From [{readme}]({readme}):", ""]
    block = []
    for l in lines[1:] + [""]:
        if l.startswith("|"):
            block.append(l)
        elif block:
            out += block + [""]
            block = []
# Before/after measurements of changes, each with its own README of figures.
import glob
import subprocess
ab = sorted(glob.glob("bench/results/*-vs-*/README.md"), reverse=True)
if ab:
    out += ["", "## Changes measured against the commit before them", ""]
    for readme in ab:
        lines = open(readme).read().splitlines()
        title = lines[0].lstrip("# ").strip()
        out += [f"[{title}]({readme}), both binaries alternated on one machine:", ""]
        out += [l for l in lines if l.startswith("|")] + [""]
# Reliability runs (the parsers' fuzzing with scripts/fuzz.sh, the server soak of
# bench/soak.py), each recorded by hand in its own README, shown whole: the newest
# run of each kind (older ones stay under bench/results/).
rel, kinds = [], set()
def run_order(readme):
    # The date, then the commit's time: runs of one day sort by their commit.
    name = os.path.basename(os.path.dirname(readme))
    commit = name[11:].split("-", 1)[0]
    t = subprocess.run(["git", "log", "-1", "--format=%ct", commit],
                       capture_output=True, text=True).stdout.strip()
    return name[:10], int(t) if t.isdigit() else 0


for readme in sorted(glob.glob("bench/results/*-reliability-*/README.md"), key=run_order,
                     reverse=True):
    kind = os.path.dirname(readme).split("-reliability-", 1)[1]
    if kind not in kinds:
        kinds.add(kind)
        rel.append(readme)
if rel:
    out += ["", "## Reliability", ""]
    for readme in rel:
        lines = open(readme).read().splitlines()
        title = lines[0].lstrip("# ").strip()
        out += [f"### {title}", "", f"From [{readme}]({readme}):", ""]
        out += lines[1:] + [""]
open("BENCHMARKS.md", "w").write("\n".join(out) + "\n")
print(f"run.sh: BENCHMARKS.md: {len(table)} rows from {len(sources)} files", file=sys.stderr)
PY
