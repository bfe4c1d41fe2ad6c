//! How a layer's offloaded part is attended, and the policy strings
//! (`dense`, `topk:k=N`, `oracle:budget=N`, `lsh:k=K,l=L,...`,
//! `threshold:eps=E`, `threshold:b=B`, each with an optional
//! `softmax=exact|sas[,sas_n=N]`) that name it.

use crate::config::{KvDtype, LshIndexParams, Precision};
use crate::config::{LSH_K, LSH_L};
use crate::error::CpuError;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use tandem_kernels::sas::{Softmax, SAS_DEFAULT_CUTOFF, SAS_MAX_CUTOFF};

/// Query-time parameters of LSH sampling; the index itself (K, L and the
/// collision threshold t) is fixed by the store ([`LshIndexParams`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LshParams {
    /// Optional cap: keep at most this many keys per query head (most
    /// collisions first, ties by lower position). The estimator's probabilities
    /// ignore the cap, so capped results are a heuristic.
    pub max_keys: Option<usize>,
    /// V rows left out, as a power of two of the softmax mass: with `n > 0`,
    /// each head leaves out the V rows of its smallest weights whose sum is at
    /// most `2^-n` of its total (the log-sum-exp still counts them), which moves
    /// the output by at most `2^-n` of the largest |value|. `0` reads the V row
    /// of every retrieved key. [`LshParams::DEFAULT_VALUE_SKIP`] is one bf16
    /// rounding step, the error the bf16 store already makes.
    pub value_skip: u8,
    /// The safety set: per query head, its `top` keys of largest logit,
    /// found by scoring every key, are attended exactly (weight `exp(logit)`)
    /// and LSH samples the rest (weight `exp(logit) / u`). The union is still
    /// an unbiased estimate of each sum, with the heavy keys, which sampling
    /// misses most costly, taken out of its variance. `0`: none.
    pub top: usize,
    /// With `per > 0`, the safety set holds at most one key in `per` of the
    /// store (at least one): it grows with the context up to `top`, as
    /// attention spreads over more keys, and stays a bounded share of it.
    pub per: usize,
}

impl LshParams {
    /// `value_skip` of the default policy: 2^-9 of the mass.
    pub const DEFAULT_VALUE_SKIP: u8 = 9;

    /// The safety set's size per query head over a store of `n` keys.
    pub fn safety_size(&self, n: usize) -> usize {
        let share = if self.per > 0 {
            n.div_ceil(self.per)
        } else {
            n
        };
        self.top.min(share).min(n)
    }
}

/// Which keys the threshold policy reports (half-space reporting, after
/// "HSR-enhanced sparse attention"): per query head, the keys whose logit
/// `q·k/√d` is at least a threshold τ, found by scanning only the blocks of
/// keys whose upper bound on the logit reaches τ (no key at or above τ is
/// missed). Softmax attention is then exact over the reported keys.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ThresholdParams {
    /// `threshold:eps=E`, `E` in (0, 1): τ_h = m̂_h − ln(n/E), with m̂_h the
    /// largest logit of head h found (blocks are visited by descending bound,
    /// so it is found early). Each of the at most n keys left out has weight
    /// below `exp(m̂_h) · E / n`, so the left-out softmax mass is below `E`
    /// times the reported mass: the output moves by at most `2·E·max|v|` and
    /// the log-sum-exp by at most `ln(1 + E)` against dense attention.
    Mass {
        /// The mass bound E.
        eps: f32,
    },
    /// `threshold:b=B`: exactly the keys of logit ≥ B (the support of
    /// ReLU-style attention cut at B); a head with none gets an empty part.
    Logit {
        /// The logit threshold B (finite).
        b: f32,
    },
}

/// How one layer's offloaded part is attended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// Exact attention over every stored key.
    Dense,
    /// LSH sampling (MagicPIG); needs a store built with `lsh: Some(..)`.
    Lsh(LshParams),
    /// Exact attention over the `k` keys with the largest logits.
    TopK(usize),
    /// Oracle sampling: `budget` keys drawn i.i.d. from the exact softmax; the
    /// output is their mean value and the lse is exact.
    Oracle {
        /// Samples per query head.
        budget: usize,
        /// Sampling seed.
        seed: u64,
    },
    /// Exact attention over the keys at or above a logit threshold, found
    /// through the store's per-block key bounds.
    Threshold(ThresholdParams),
}

/// What a worker step runs over a layer's offloaded part: the policy and
/// how it turns logits into softmax weights. A bare [`Policy`] uses the
/// exact softmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attend {
    /// Which keys are attended, and how.
    pub policy: Policy,
    /// The softmax's weights: exact, or SAS (see [`tandem_kernels::sas`]).
    pub softmax: Softmax,
    /// KV heads (bit `h` for head `h < 64`) that attend every key exactly
    /// ([`Policy::Dense`]) whatever `policy` says: those a fidelity check
    /// found the policy cannot serve.
    pub exact_heads: u64,
}

impl Attend {
    /// What kv head `h` runs: `self`, or dense where `exact_heads` says so.
    pub fn for_kv_head(self, h: usize) -> Attend {
        if h < 64 && self.exact_heads >> h & 1 == 1 {
            Attend {
                policy: Policy::Dense,
                ..self
            }
        } else {
            self
        }
    }
}

impl From<Policy> for Attend {
    fn from(policy: Policy) -> Attend {
        Attend {
            policy,
            softmax: Softmax::Exact,
            exact_heads: 0,
        }
    }
}

/// Components of the key sketch for heads of dimension `d` (see
/// [`Policy::sketch_rank`]): half the dimension rounded down to a multiple
/// of 8, from 8 to 32; none for `d` up to 8.
pub const fn sketch_rank_for(d: usize) -> usize {
    let r = d / 16 * 8;
    if d <= 8 {
        0
    } else if r < 8 {
        8
    } else if r > 32 {
        32
    } else {
        r
    }
}

impl Policy {
    /// Components of the key sketch the policy's store needs
    /// ([`crate::LayerConfig::sketch`]) for heads of dimension `d`: LSH with a
    /// safety set finds it through the sketch; other policies need none.
    pub fn sketch_rank(&self, d: usize) -> usize {
        match self {
            Policy::Lsh(p) if p.top > 0 => sketch_rank_for(d),
            _ => 0,
        }
    }
}

/// A policy parsed from its string, with the store it needs.
///
/// Accepted: `dense`, `topk:k=N`, `oracle:budget=N` (seed 7),
/// `lsh:k=K,l=L[,t=T][,max_keys=M][,vskip=S][,top=N[,per=P]]` (t 2, vskip
/// [`LshParams::DEFAULT_VALUE_SKIP`] and no safety set by default), `threshold:eps=E` (E in
/// (0, 1)) or `threshold:b=B` (B a finite logit; exactly one of eps and b),
/// each with an optional
/// `kbits=2|4|8|16|32` and `vbits=2|4|8|16`: the offloaded keys' and values'
/// bits ([`KvDtype`]; 16, bf16, by default; `kbits=32` makes both f32), and
/// `int2_heads=N`, the kv heads per layer held at int2 instead; and an
/// optional `softmax=exact|sas` with, for `sas`, `sas_n=N` (the cut-off, 1 to
/// 16, default 8: see [`tandem_kernels::sas`]). [`fmt::Display`] writes the
/// canonical form (every lsh parameter, in that order, then the storage, then
/// `softmax=sas,sas_n=N` unless exact; the oracle's seed is not written).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySpec {
    /// The engine policy.
    pub policy: Policy,
    /// The index the policy needs, if any.
    pub lsh: Option<LshIndexParams>,
    /// How the offloaded keys and values are stored.
    pub kv_dtype: KvDtype,
    /// How the policy's passes compute softmax weights.
    pub softmax: Softmax,
}

/// Seed of the oracle policies parsed from strings.
const ORACLE_SEED: u64 = 7;

/// A policy string's `key=value` parameters, as written: most are
/// non-negative integers, the threshold's are reals.
struct Params<'s> {
    spec: &'s str,
    values: BTreeMap<String, String>,
}

impl<'s> Params<'s> {
    fn err(&self, problem: &str) -> CpuError {
        policy_error(self.spec, problem)
    }

    /// The parameters after the `:` of `spec`.
    fn parse(spec: &'s str, rest: &str) -> Result<Self, CpuError> {
        let mut values = BTreeMap::new();
        for part in rest.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| policy_error(spec, &format!("expected key=value, got {part:?}")))?;
            if values
                .insert(k.trim().to_string(), v.trim().to_string())
                .is_some()
            {
                return Err(policy_error(spec, &format!("{k} given twice")));
            }
        }
        Ok(Params { spec, values })
    }

    /// The non-negative integer `key`, if given.
    fn take(&mut self, key: &str) -> Result<Option<usize>, CpuError> {
        self.values
            .remove(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| self.err(&format!("{key}: not a non-negative integer")))
            })
            .transpose()
    }

    /// The real `key`, if given.
    fn take_real(&mut self, key: &str) -> Result<Option<f32>, CpuError> {
        self.values
            .remove(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| self.err(&format!("{key}: not a number")))
            })
            .transpose()
    }

    fn require(&mut self, key: &str, problem: &str) -> Result<usize, CpuError> {
        self.take(key)?.ok_or_else(|| self.err(problem))
    }

    fn kv_dtype(&mut self) -> Result<KvDtype, CpuError> {
        let keys = match self.take("kbits")? {
            None => Precision::Bf16,
            Some(b) => Precision::from_bits(b)
                .ok_or_else(|| self.err("kbits must be 2, 4, 8, 16 or 32"))?,
        };
        let values = match self.take("vbits")? {
            None => KvDtype::default_values(keys),
            Some(b) => match Precision::from_bits(b) {
                Some(Precision::F32) if keys != Precision::F32 => {
                    return Err(self.err("vbits=32 only with kbits=32"))
                }
                Some(p) => p,
                None => return Err(self.err("vbits must be 2, 4, 8 or 16")),
            },
        };
        if keys == Precision::F32 && values != Precision::F32 {
            return Err(self.err("kbits=32 holds the values as f32 too"));
        }
        let dtype = KvDtype::new(keys, values);
        match self.take("int2_heads")? {
            None | Some(0) => Ok(dtype),
            Some(_) if dtype == KvDtype::INT2 => {
                Err(self.err("int2_heads needs kbits or vbits above 2"))
            }
            Some(n) => u8::try_from(n)
                .map(|n| dtype.with_int2_heads(n))
                .map_err(|_| self.err("int2_heads must be at most 255")),
        }
    }

    fn softmax(&mut self) -> Result<Softmax, CpuError> {
        let cutoff = self.take("sas_n")?;
        match (self.values.remove("softmax").as_deref(), cutoff) {
            (None | Some("exact"), None) => Ok(Softmax::Exact),
            (Some("sas"), cutoff) => match cutoff.unwrap_or(SAS_DEFAULT_CUTOFF.into()) {
                n if (1..=usize::from(SAS_MAX_CUTOFF)).contains(&n) => {
                    Ok(Softmax::Sas { cutoff: n as u8 })
                }
                _ => Err(self.err(&format!("sas_n must be in 1..={SAS_MAX_CUTOFF}"))),
            },
            (None | Some("exact"), Some(_)) => Err(self.err("sas_n needs softmax=sas")),
            (Some(_), _) => Err(self.err("softmax must be exact or sas")),
        }
    }

    fn lsh(&mut self) -> Result<(Policy, LshIndexParams), CpuError> {
        let k = self.require("k", "lsh needs k=K")?;
        let l = self.require("l", "lsh needs l=L")?;
        let t = self.take("t")?.unwrap_or(2);
        if !LSH_K.contains(&k) {
            return Err(self.err("k must be in 1..=16"));
        }
        if !LSH_L.contains(&l) {
            return Err(self.err("l must be in 1..=512"));
        }
        if t == 0 || t > l.min(255) {
            return Err(self.err("t must be in 1..=min(L,255)"));
        }
        let max_keys = self.take("max_keys")?;
        let value_skip = self
            .take("vskip")?
            .unwrap_or(LshParams::DEFAULT_VALUE_SKIP.into());
        if value_skip > 24 {
            return Err(self.err("vskip must be in 0..=24 (0 reads every V row)"));
        }
        let top = self.take("top")?.unwrap_or(0);
        let per = self.take("per")?.unwrap_or(0);
        if per > 0 && top == 0 {
            return Err(self.err("per needs top=N (the safety set's largest size)"));
        }
        let policy = Policy::Lsh(LshParams {
            max_keys,
            value_skip: value_skip as u8,
            top,
            per,
        });
        Ok((policy, LshIndexParams { k, l, t: t as u8 }))
    }

    fn threshold(&mut self) -> Result<ThresholdParams, CpuError> {
        match (self.take_real("eps")?, self.take_real("b")?) {
            (Some(eps), None) if eps > 0.0 && eps < 1.0 => Ok(ThresholdParams::Mass { eps }),
            (Some(_), None) => Err(self.err("eps must be in (0, 1)")),
            (None, Some(b)) if b.is_finite() => Ok(ThresholdParams::Logit { b }),
            (None, Some(_)) => Err(self.err("b must be a finite logit")),
            _ => Err(self.err("threshold needs exactly one of eps=E and b=B")),
        }
    }
}

fn policy_error(spec: &str, problem: &str) -> CpuError {
    CpuError::Policy {
        spec: spec.to_string(),
        problem: problem.to_string(),
    }
}

/// Parses one kind's parameters into its policy and the index it needs.
type KindParser = fn(&mut Params<'_>) -> Result<(Policy, Option<LshIndexParams>), CpuError>;

/// `dense`: every offloaded key, attended exactly; no parameters of its own.
const DENSE: KindParser = |_| Ok((Policy::Dense, None));

/// Every policy kind [`PolicySpec`] parses, by name.
const KINDS: [(&str, KindParser); 5] = [
    ("dense", DENSE),
    ("topk", |p| {
        Ok((Policy::TopK(p.require("k", "topk needs k=N")?), None))
    }),
    ("oracle", |p| {
        let budget = p.require("budget", "oracle needs budget=N")?;
        let seed = ORACLE_SEED;
        Ok((Policy::Oracle { budget, seed }, None))
    }),
    ("lsh", |p| {
        let (policy, index) = p.lsh()?;
        Ok((policy, Some(index)))
    }),
    ("threshold", |p| {
        Ok((Policy::Threshold(p.threshold()?), None))
    }),
];

/// The names of the policy kinds [`PolicySpec`] parses (`dense`, `topk`, ...).
pub fn policy_kinds() -> impl Iterator<Item = &'static str> {
    KINDS.iter().map(|(name, _)| *name)
}

impl FromStr for PolicySpec {
    type Err = CpuError;

    fn from_str(s: &str) -> Result<Self, CpuError> {
        let kind = s.split_once(':').map_or(s, |(kind, _)| kind);
        let Some((_, parse_kind)) = KINDS.iter().find(|(name, _)| *name == kind) else {
            let known = policy_kinds().collect::<Vec<_>>().join(", ");
            return Err(policy_error(
                s,
                &format!("unknown policy kind (kinds: {known})"),
            ));
        };
        PolicySpec::parse_with(s, *parse_kind)
    }
}

impl PolicySpec {
    /// Parses `spec` as a `dense` policy whatever its kind is named (an
    /// embedder's alias for attending every offloaded key exactly), with
    /// `dense`'s parameters; errors quote `spec` as written.
    pub fn parse_as_dense(spec: &str) -> Result<PolicySpec, CpuError> {
        PolicySpec::parse_with(spec, DENSE)
    }

    /// Parses the parameters after the `:` of `s` with one kind's parser.
    fn parse_with(s: &str, parse_kind: KindParser) -> Result<PolicySpec, CpuError> {
        let rest = s.split_once(':').map_or("", |(_, rest)| rest);
        let mut params = Params::parse(s, rest)?;
        let kv_dtype = params.kv_dtype()?;
        let softmax = params.softmax()?;
        let (policy, lsh) = parse_kind(&mut params)?;
        if let Some(k) = params.values.keys().next() {
            return Err(params.err(&format!("unknown parameter {k:?}")));
        }
        Ok(PolicySpec {
            policy,
            lsh,
            kv_dtype,
            softmax,
        })
    }
}

impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut params = Vec::new();
        let kind = match self.policy {
            Policy::Dense => "dense",
            Policy::TopK(k) => {
                params.push(format!("k={k}"));
                "topk"
            }
            Policy::Oracle { budget, .. } => {
                params.push(format!("budget={budget}"));
                "oracle"
            }
            Policy::Lsh(p) => {
                if let Some(ix) = self.lsh {
                    params.push(format!("k={},l={},t={}", ix.k, ix.l, ix.t));
                }
                if let Some(m) = p.max_keys {
                    params.push(format!("max_keys={m}"));
                }
                params.push(format!("vskip={}", p.value_skip));
                if p.top > 0 {
                    params.push(format!("top={}", p.top));
                }
                if p.per > 0 {
                    params.push(format!("per={}", p.per));
                }
                "lsh"
            }
            Policy::Threshold(ThresholdParams::Mass { eps }) => {
                params.push(format!("eps={eps}"));
                "threshold"
            }
            Policy::Threshold(ThresholdParams::Logit { b }) => {
                params.push(format!("b={b}"));
                "threshold"
            }
        };
        let KvDtype {
            keys,
            values,
            int2_heads,
        } = self.kv_dtype;
        if keys != Precision::Bf16 {
            params.push(format!("kbits={}", keys.bits()));
        }
        if values != KvDtype::default_values(keys) {
            params.push(format!("vbits={}", values.bits()));
        }
        if int2_heads > 0 {
            params.push(format!("int2_heads={int2_heads}"));
        }
        if let Softmax::Sas { cutoff } = self.softmax {
            params.push(format!("softmax=sas,sas_n={cutoff}"));
        }
        match params.is_empty() {
            true => write!(f, "{kind}"),
            false => write!(f, "{kind}:{}", params.join(",")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_policy(s: &str) -> Result<PolicySpec, CpuError> {
        s.parse()
    }

    #[test]
    fn the_safety_set_grows_with_the_store_up_to_top() {
        let p = |top, per| LshParams {
            max_keys: None,
            value_skip: 0,
            top,
            per,
        };
        assert_eq!(p(128, 64).safety_size(2048), 32);
        assert_eq!(p(128, 64).safety_size(2049), 33);
        assert_eq!(p(128, 64).safety_size(8192), 128);
        assert_eq!(p(128, 64).safety_size(98304), 128);
        assert_eq!(p(128, 64).safety_size(10), 1);
        assert_eq!(p(128, 64).safety_size(0), 0);
        assert_eq!(p(64, 0).safety_size(98304), 64);
        assert_eq!(p(64, 0).safety_size(40), 40);
        assert_eq!(p(0, 0).safety_size(98304), 0);
    }

    #[test]
    fn policy_parser_accepts_and_rejects() {
        let p = parse_policy("lsh:k=10,l=150").expect("ok");
        assert_eq!(
            p.lsh,
            Some(LshIndexParams {
                k: 10,
                l: 150,
                t: 2
            })
        );
        assert_eq!(
            p.policy,
            Policy::Lsh(LshParams {
                max_keys: None,
                value_skip: 9,
                top: 0,
                per: 0,
            })
        );
        let p = parse_policy("lsh:k=10,l=150,t=3,max_keys=100,vskip=0").expect("ok");
        assert_eq!(
            p.lsh,
            Some(LshIndexParams {
                k: 10,
                l: 150,
                t: 3
            })
        );
        assert_eq!(
            p.policy,
            Policy::Lsh(LshParams {
                max_keys: Some(100),
                value_skip: 0,
                top: 0,
                per: 0,
            })
        );
        assert!(parse_policy("lsh:k=10,l=150,vskip=25").is_err());
        assert_eq!(
            parse_policy("lsh:k=10,l=150").expect("ok").kv_dtype,
            KvDtype::BF16
        );
        assert_eq!(
            parse_policy("topk:k=8,kbits=8").expect("ok").kv_dtype,
            KvDtype::K8
        );
        assert_eq!(
            parse_policy("dense,kbits=32").map(|p| p.kv_dtype).ok(),
            None
        );
        assert!(parse_policy("lsh:k=10,l=150,kbits=3").is_err());
        assert!(parse_policy("lsh:k=10,l=150,vbits=32").is_err());
        assert!(parse_policy("dense:kbits=32,vbits=4").is_err());
        assert_eq!(parse_policy("dense").expect("ok").policy, Policy::Dense);
        assert_eq!(
            parse_policy("topk:k=2048").expect("ok").policy,
            Policy::TopK(2048)
        );
        assert!(matches!(
            parse_policy("oracle:budget=5").expect("ok").policy,
            Policy::Oracle { budget: 5, .. }
        ));
        for bad in [
            "lsh:k=10",
            "lsh:k=17,l=1",
            "lsh:k=10,l=150,x=1",
            "lsh:k=a,l=1",
            "foo",
            "topk",
            "lsh:k=2,l=3,t=4",
            "topk:k=1,k=2",
        ] {
            assert!(parse_policy(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn canonical_strings_parse_back_to_the_same_spec() {
        for (given, canonical) in [
            ("dense", "dense"),
            ("dense:kbits=16", "dense"),
            ("dense:kbits=8,vbits=8", "dense:kbits=8,vbits=8"),
            ("topk:kbits=32,k=64", "topk:k=64,kbits=32"),
            ("oracle:budget=5", "oracle:budget=5"),
            ("lsh:k=10,l=150", "lsh:k=10,l=150,t=2,vskip=9"),
            (
                "lsh:vskip=0,max_keys=100,t=3,l=150,k=10,kbits=8",
                "lsh:k=10,l=150,t=3,max_keys=100,vskip=0,kbits=8",
            ),
            ("lsh:top=64,k=8,l=75", "lsh:k=8,l=75,t=2,vskip=9,top=64"),
            (
                "lsh:per=64,top=128,k=8,l=75",
                "lsh:k=8,l=75,t=2,vskip=9,top=128,per=64",
            ),
        ] {
            let spec = parse_policy(given).expect("parses");
            assert_eq!(spec.to_string(), canonical, "{given}");
            assert_eq!(parse_policy(canonical).expect("parses"), spec, "{given}");
        }
        assert!(matches!(
            parse_policy("lsh:k=0,l=1"),
            Err(CpuError::Policy { ref spec, .. }) if spec == "lsh:k=0,l=1"
        ));
    }

    #[test]
    fn every_key_and_value_precision_pair_round_trips() {
        let ints = [2, 4, 8, 16];
        let pairs = ints.iter().flat_map(|&k| ints.iter().map(move |&v| (k, v)));
        for (k, v) in pairs.chain([(32, 32)]) {
            let given = format!("topk:k=8,kbits={k},vbits={v}");
            let spec = parse_policy(&given).expect("parses");
            assert_eq!(spec.kv_dtype.keys.bits(), k, "{given}");
            assert_eq!(spec.kv_dtype.values.bits(), v, "{given}");
            let canonical = spec.to_string();
            assert_eq!(
                parse_policy(&canonical).expect("parses"),
                spec,
                "{canonical}"
            );
        }
        let spec = parse_policy("lsh:k=10,l=75,kbits=4,vbits=2").expect("parses");
        assert_eq!(
            spec.to_string(),
            "lsh:k=10,l=75,t=2,vskip=9,kbits=4,vbits=2"
        );
        let spec = parse_policy("lsh:int2_heads=2,k=10,l=75,kbits=4,vbits=4").expect("parses");
        assert_eq!(spec.kv_dtype.int2_heads, 2);
        assert_eq!(
            spec.to_string(),
            "lsh:k=10,l=75,t=2,vskip=9,kbits=4,vbits=4,int2_heads=2"
        );
        assert_eq!(spec.to_string().parse::<PolicySpec>().ok(), Some(spec));
        let none = parse_policy("dense:kbits=8,int2_heads=0").expect("parses");
        assert_eq!(none.to_string(), "dense:kbits=8");
        assert!(parse_policy("dense:kbits=2,vbits=2,int2_heads=1").is_err());
        assert!(parse_policy("dense:kbits=4,int2_heads=256").is_err());
        let spec = parse_policy("dense:vbits=4").expect("parses");
        assert_eq!(spec.to_string(), "dense:vbits=4");
    }

    #[test]
    fn threshold_strings_parse_print_canonically_and_reject_bad_values() {
        let mass = |eps| Policy::Threshold(ThresholdParams::Mass { eps });
        let logit = |b| Policy::Threshold(ThresholdParams::Logit { b });
        for (given, policy, canonical) in [
            ("threshold:eps=0.01", mass(0.01), "threshold:eps=0.01"),
            ("threshold:eps=1e-3", mass(0.001), "threshold:eps=0.001"),
            (
                "threshold:eps=0.5,kbits=8",
                mass(0.5),
                "threshold:eps=0.5,kbits=8",
            ),
            ("threshold:b=-1.5", logit(-1.5), "threshold:b=-1.5"),
            ("threshold:b=3", logit(3.0), "threshold:b=3"),
            (
                "threshold:kbits=8,vbits=8,b=0.25",
                logit(0.25),
                "threshold:b=0.25,kbits=8,vbits=8",
            ),
        ] {
            let spec = parse_policy(given).expect(given);
            assert_eq!(spec.policy, policy, "{given}");
            assert_eq!(spec.lsh, None, "{given}");
            assert_eq!(spec.to_string(), canonical, "{given}");
            assert_eq!(parse_policy(canonical).expect("parses"), spec, "{given}");
        }
        for bad in [
            "threshold",
            "threshold:eps=0",
            "threshold:eps=1",
            "threshold:eps=-0.1",
            "threshold:eps=1.5",
            "threshold:eps=NaN",
            "threshold:eps=x",
            "threshold:b=inf",
            "threshold:b=NaN",
            "threshold:eps=0.1,b=1",
            "threshold:eps=0.1,eps=0.2",
            "threshold:eps=0.1,k=3",
            "topk:k=0.5",
            "lsh:k=8,l=75,per=64",
        ] {
            assert!(parse_policy(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn softmax_modes_parse_print_canonically_and_reject_bad_cutoffs() {
        let sas = |cutoff| Softmax::Sas { cutoff };
        for (given, softmax, canonical) in [
            ("dense:softmax=exact", Softmax::Exact, "dense"),
            ("dense:softmax=sas", sas(8), "dense:softmax=sas,sas_n=8"),
            (
                "topk:sas_n=3,softmax=sas,k=9",
                sas(3),
                "topk:k=9,softmax=sas,sas_n=3",
            ),
            (
                "lsh:k=10,l=75,top=128,per=32,softmax=sas,kbits=8",
                sas(8),
                "lsh:k=10,l=75,t=2,vskip=9,top=128,per=32,kbits=8,softmax=sas,sas_n=8",
            ),
            (
                "oracle:budget=4,softmax=sas,sas_n=16",
                sas(16),
                "oracle:budget=4,softmax=sas,sas_n=16",
            ),
            (
                "threshold:eps=0.1,softmax=sas,sas_n=1",
                sas(1),
                "threshold:eps=0.1,softmax=sas,sas_n=1",
            ),
        ] {
            let spec = parse_policy(given).expect(given);
            assert_eq!(spec.softmax, softmax, "{given}");
            assert_eq!(spec.to_string(), canonical, "{given}");
            assert_eq!(parse_policy(canonical).expect("parses"), spec, "{given}");
        }
        for bad in [
            "dense:softmax=sas,sas_n=0",
            "dense:softmax=sas,sas_n=17",
            "dense:softmax=sas,sas_n=-1",
            "dense:softmax=sas,sas_n=2.5",
            "dense:sas_n=8",
            "dense:softmax=exact,sas_n=8",
            "dense:softmax=fast",
            "dense:softmax=sas,softmax=sas",
        ] {
            assert!(
                matches!(parse_policy(bad), Err(CpuError::Policy { .. })),
                "{bad}"
            );
        }
    }
}
