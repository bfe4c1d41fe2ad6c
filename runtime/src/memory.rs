//! The memory budget: what a context will hold, estimated from the policy
//! table, with the model's weights and a prefill chunk's activations, and
//! checked against the memory the machine has before anything is allocated.

use std::fmt;

use tandem_gpu::AttentionShape;

use crate::error::{Error, Result};
use crate::model::Config;
use crate::policy::{LayerAttention, PolicyTable};

/// How much memory contexts may take, and where that figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    limit: u64,
    origin: BudgetOrigin,
}

/// Where a budget's limit came from (said in refusals, so the user knows
/// which knob to turn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetOrigin {
    /// `MemAvailable` of `/proc/meminfo` when the budget was taken.
    System,
    /// Given by the user (`--memory-limit`).
    Given,
    /// The system's memory could not be read: nothing is refused.
    Unknown,
}

impl MemoryBudget {
    /// The memory available now (`MemAvailable`); unlimited where
    /// `/proc/meminfo` cannot be read.
    pub fn system() -> MemoryBudget {
        match std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| mem_available(&m))
        {
            Some(limit) => MemoryBudget {
                limit,
                origin: BudgetOrigin::System,
            },
            None => MemoryBudget {
                limit: u64::MAX,
                origin: BudgetOrigin::Unknown,
            },
        }
    }

    /// A limit of `bytes`.
    pub fn given(bytes: u64) -> MemoryBudget {
        MemoryBudget {
            limit: bytes,
            origin: BudgetOrigin::Given,
        }
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Refuses `need` bytes for `what` (e.g. "a context of 10000000 tokens")
    /// beyond the limit; `None` is a size too large to count.
    pub fn check(&self, what: &str, need: Option<u64>) -> Result<()> {
        match need {
            Some(need) if need <= self.limit => Ok(()),
            _ => Err(Error::OutOfMemory {
                what: what.to_string(),
                need: need.map_or_else(
                    || "more than 2^64 bytes".into(),
                    |n| format!("about {}", Bytes(n)),
                ),
                limit: Bytes(self.limit).to_string(),
                origin: self.origin.to_string(),
            }),
        }
    }
}

impl fmt::Display for BudgetOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BudgetOrigin::System => "the memory available, MemAvailable in /proc/meminfo",
            BudgetOrigin::Given => "the memory limit given",
            BudgetOrigin::Unknown => "unknown",
        })
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Parses a size: bytes, or a number with a suffix K, M, G or T (powers of
/// 1024; `GB`, `GiB` alike), e.g. `8G`, `512MiB`, `1.5g`.
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = || {
        Error::InvalidRequest(format!(
            "{text:?} is not a size (bytes, or a number with K, M, G or T)"
        ))
    };
    let t = text.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (number, shift) = match t.char_indices().last() {
        Some((i, 'k')) => (&t[..i], 10),
        Some((i, 'm')) => (&t[..i], 20),
        Some((i, 'g')) => (&t[..i], 30),
        Some((i, 't')) => (&t[..i], 40),
        _ => (t, 0),
    };
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    let bytes = value * (1u64 << shift) as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Bytes one sequence holds per token of context under `table`, at its
/// peak: every layer with keys of its own holds them on the device (bf16, as
/// the prompt is prefilled), and an offloading layer holds its store as well.
pub fn context_bytes_per_token(table: &PolicyTable, shape: AttentionShape) -> u64 {
    let (heads, d) = (shape.n_kv_heads, shape.head_dim);
    let device_row = (heads * d * 4) as u64;
    table
        .layers
        .iter()
        .map(|l| match &l.attention {
            LayerAttention::Shared { .. } => 0,
            LayerAttention::Offloaded { lsh, kv_dtype, .. } => {
                let store = tandem_cpu::store_bytes_per_key(*kv_dtype, *lsh, d) * heads;
                device_row + store as u64
            }
            LayerAttention::Dense | LayerAttention::Window { .. } => device_row,
        })
        .sum()
}

/// Bytes `sequences` sequences of `tokens` tokens each hold under `table`;
/// `None` past 2^64.
pub fn context_bytes(
    table: &PolicyTable,
    shape: AttentionShape,
    tokens: usize,
    sequences: usize,
) -> Option<u64> {
    context_bytes_per_token(table, shape)
        .checked_mul(u64::try_from(tokens).ok()?)?
        .checked_mul(u64::try_from(sequences).ok()?)
}

/// Bytes one prefill chunk of `chunk` tokens holds in activations while it
/// runs (f32 rows): per token the hidden state and its normed copy, the
/// queries and the attention output, the keys and values, the MLP's gate,
/// up and activated rows; and the last position's logits. `None` past 2^64.
pub fn activation_bytes(config: &Config, chunk: usize) -> Option<u64> {
    let kv_dim = config.n_kv_heads.checked_mul(config.head_dim)?;
    let row = [
        config.dim.checked_mul(2)?,
        config.q_dim().checked_mul(2)?,
        kv_dim.checked_mul(2)?,
        config.ffn_dim.checked_mul(3)?,
    ]
    .into_iter()
    .try_fold(0usize, usize::checked_add)?;
    let rows = u64::try_from(row)
        .ok()?
        .checked_mul(u64::try_from(chunk).ok()?)?;
    let logits = u64::try_from(config.vocab_size).ok()?;
    rows.checked_add(logits)?.checked_mul(4)
}

/// What running any context costs beside the context itself: the weights it
/// keeps resident (a mapped file's pages count as available memory until
/// they are read, so they are counted here) and one prefill chunk's
/// activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunFootprint {
    /// Bytes of the model's weights.
    pub weights: u64,
    /// Bytes of one prefill chunk's activations.
    pub activations: u64,
}

impl RunFootprint {
    /// The bytes a run needs with a context of `context` bytes; `None` past
    /// 2^64 (or when the context's own size is).
    pub fn with_context(&self, context: Option<u64>) -> Option<u64> {
        context?
            .checked_add(self.weights)?
            .checked_add(self.activations)
    }
}

/// A byte count written for people: `1.5 GB`.
#[derive(Debug, Clone, Copy)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        match self.0 {
            0..1_000_000 => write!(f, "{:.1} kB", b / 1e3),
            1_000_000..1_000_000_000 => write!(f, "{:.1} MB", b / 1e6),
            _ => write!(f, "{:.1} GB", b / 1e9),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyConfig;

    #[test]
    fn weights_and_a_chunks_activations_count_beside_the_context() {
        // Llama 3.1 8B: 4096 wide, 14336 in the MLP, 32 query and 8 kv heads.
        let config = Config::llama(32, 4096, 14336, 32, 8, 128_256, 500_000.0, 131_072);
        let row = 2 * 4096 + 2 * 4096 + 2 * 1024 + 3 * 14336;
        assert_eq!(
            activation_bytes(&config, 256),
            Some((256 * row + 128_256) * 4)
        );
        let run = RunFootprint {
            weights: 4 << 30,
            activations: activation_bytes(&config, 256).expect("fits"),
        };
        let table = PolicyConfig::default().resolve(&[None; 32]).expect("table");
        let context = context_bytes(&table, SHAPE, 4096, 1);
        let budget = MemoryBudget::given(4 << 30);
        assert!(budget.check("a context", context).is_ok());
        let err = budget
            .check("a context", run.with_context(context))
            .expect_err("the weights alone fill the budget");
        assert!(err.to_string().contains("4.3 GB"), "{err}");
        assert_eq!(run.with_context(None), None);
        assert_eq!(activation_bytes(&config, usize::MAX), None);
    }

    const SHAPE: AttentionShape = AttentionShape {
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
    };

    #[test]
    fn reads_mem_available() {
        let m = "MemTotal:  16000000 kB\nMemFree: 1 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(mem_available(m), Some(2048 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5gb").unwrap(), 3 << 29);
        for bad in ["", "G", "-1G", "0", "1e30T", "lots"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_int8_store_needs_less_and_huge_contexts_are_refused() {
        let table = |policy: &str| {
            PolicyConfig {
                policy: policy.into(),
                ..PolicyConfig::default()
            }
            .resolve(&[None; 32])
            .unwrap()
        };
        let dense = context_bytes_per_token(&table("dense"), SHAPE);
        assert_eq!(dense, 32 * 8 * 128 * 4);
        let bf16 = context_bytes_per_token(&table("lsh:k=10,l=75"), SHAPE);
        let int8 = context_bytes_per_token(&table("lsh:k=10,l=75,kbits=8,vbits=8"), SHAPE);
        assert!(dense < int8 && int8 < bf16);
        let t = table("dense");
        assert_eq!(context_bytes(&t, SHAPE, usize::MAX, 1), None);
        let budget = MemoryBudget::given(1 << 30);
        let err = budget
            .check("a context", context_bytes(&t, SHAPE, 10_000_000, 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("1310.7 GB"), "{err}");
        assert!(err.contains("1.1 GB"), "{err}");
        assert!(budget
            .check("a context", context_bytes(&t, SHAPE, 1000, 1))
            .is_ok());
    }
}
