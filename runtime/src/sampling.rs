//! Choosing the next token from logits.

use tandem_kernels::rng::SplitMix64;

/// How to pick the next token. The default is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy (always the most likely token).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: no limit).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0: no limit).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recently seen tokens by this (1: off).
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repetition_window: usize,
    /// Seed of the random generator, for reproducible sampling.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_window: 64,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Checks the values are in range, with a message naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A sampler with its own seeded random generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: SplitMix64,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for `config`.
    pub fn new(config: SamplingConfig) -> Sampler {
        let rng = SplitMix64(config.seed ^ 0x853c_49e6_748f_ea9b);
        Sampler {
            config,
            rng,
            candidates: Vec::new(),
        }
    }

    /// Picks a token from `logits`, given the tokens seen so far (for the penalty).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let c = &self.config;
        if c.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(c.repetition_window);
            let mut seen: Vec<u32> = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / c.repetition_penalty
                    } else {
                        *l * c.repetition_penalty
                    };
                }
            }
        }
        if c.temperature == 0.0 {
            return tandem_kernels::ops::argmax(logits).unwrap_or(0) as u32;
        }
        // Shifted by the largest logit before dividing: a tiny temperature
        // then gives 0 and -inf, never inf - inf.
        let top = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, (l - top) / c.temperature)),
        );
        if self.candidates.is_empty() {
            return 0;
        }
        if c.top_k > 0 && c.top_k < self.candidates.len() {
            // Partition first: only the k kept candidates need sorting.
            self.candidates
                .select_nth_unstable_by(c.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            self.candidates.truncate(c.top_k);
        }
        if c.top_p < 1.0 {
            self.candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        } else {
            // Only the maximum must come first (for min-p and the softmax shift).
            let best = (0..self.candidates.len())
                .max_by(|&a, &b| self.candidates[a].1.total_cmp(&self.candidates[b].1))
                .unwrap_or(0);
            self.candidates.swap(0, best);
        }
        let max = self.candidates[0].1;
        let mut total = 0.0;
        for cand in self.candidates.iter_mut() {
            cand.1 = (cand.1 - max).exp();
            total += cand.1;
        }
        // min-p: relative to the top probability, which is exp(0) = 1 here.
        let min_p = c.min_p;
        let mut keep = self
            .candidates
            .iter()
            .take_while(|cand| cand.1 >= min_p)
            .count()
            .max(1);
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, cand) in self.candidates[..keep].iter().enumerate() {
                acc += cand.1 / total;
                if acc >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        self.candidates.truncate(keep);
        let kept: f32 = self.candidates.iter().map(|c| c.1).sum();
        let mut r = self.rng.next_f32() * kept;
        for &(id, p) in &self.candidates {
            if r < p {
                return id;
            }
            r -= p;
        }
        self.candidates[self.candidates.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_max() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn a_tiny_temperature_samples_the_max() {
        let cfg = SamplingConfig {
            temperature: 1e-38,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [10.0, 30.0, 29.0, -5.0], &[]), 1);
        }
    }

    #[test]
    fn repetition_penalty_changes_the_choice() {
        let cfg = SamplingConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn top_k_1_is_greedy_and_seeds_reproduce() {
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[]), 1);
        }
        let cfg = SamplingConfig {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let logits = [0.0f32; 50];
        let run = |cfg: &SamplingConfig| {
            let mut s = Sampler::new(cfg.clone());
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&cfg), run(&cfg));
        let draws = run(&cfg);
        assert!(
            draws.iter().any(|&d| d != draws[0]),
            "uniform logits should not always give one token"
        );
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_p: 0.5,
            seed: 3,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [5.0, 0.0, 0.0, 0.0], &[]), 0);
        }
        let cfg = SamplingConfig {
            temperature: 1.0,
            min_p: 0.5,
            seed: 3,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg);
        for _ in 0..50 {
            assert!(s.sample(&mut [2.0, 2.0, -5.0, -5.0], &[]) < 2);
        }
    }

    #[test]
    fn validation_rejects_nonsense() {
        assert!(SamplingConfig {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingConfig {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingConfig::default().validate().is_ok());
    }
}
