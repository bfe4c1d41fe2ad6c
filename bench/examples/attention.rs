//! `cargo run --release -p tandem-bench --example attention -- --context 98304
//! --shape llama3.1-8b --policy lsh:k=10,l=150 --threads 2 [--json]`
//! (`--policy` may be repeated; also `--seed N`, `--iterations N`, `--layers N`).

use tandem_bench::{format_table, run_attention_bench, AttentionBenchOptions};

fn main() {
    let mut opts = AttentionBenchOptions {
        context: 98304,
        shape: "llama3.1-8b".into(),
        policies: Vec::new(),
        threads: 2,
        seed: 42,
        iterations: 5,
        layers: 1,
        memory_limit: None,
    };
    let mut json = false;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        let num = || {
            val.parse::<usize>()
                .map_err(|_| format!("{}: expected a number, got {val:?}", args[i]))
        };
        let r: Result<(), String> = match args[i].as_str() {
            "--json" => {
                json = true;
                i += 1;
                continue;
            }
            "--context" => num().map(|v| opts.context = v),
            "--threads" => num().map(|v| opts.threads = v),
            "--iterations" => num().map(|v| opts.iterations = v),
            "--layers" => num().map(|v| opts.layers = v),
            "--seed" => num().map(|v| opts.seed = v as u64),
            "--shape" => {
                opts.shape = val.clone();
                Ok(())
            }
            "--policy" => {
                opts.policies.push(val.clone());
                Ok(())
            }
            other => Err(format!("unknown flag {other}")),
        };
        if let Err(e) = r {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
        i += 2;
    }
    if opts.policies.is_empty() {
        opts.policies.push("lsh:k=10,l=150".into());
    }
    match run_attention_bench(&opts) {
        Ok(r) if json => match serde_json::to_string_pretty(&r) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        },
        Ok(r) => print!("{}", format_table(&r)),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
