//! Teacher-forced agreement between a policy's logits and dense logits.
//!
//! For every scored position the model has seen the same text under both
//! attentions; we compare the two next-token distributions (top-1, KL) and the
//! likelihood each gives the true next token. All arithmetic is in `f64` with a
//! max-shifted log-sum-exp, so large logits neither overflow nor lose the KL.

use serde::{Deserialize, Serialize};

use tandem_runtime::{Error, Result};

/// The comparison at one position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PositionScore {
    /// Whether both distributions rank the same token first (ties go to the lowest id).
    pub top1_agrees: bool,
    /// KL(dense || policy) in nats; `+inf` if the policy gives zero probability to a
    /// token dense does not.
    pub kl: f64,
    /// Negative log-likelihood of the target under the policy, in nats.
    pub nll: f64,
    /// Negative log-likelihood of the target under dense, in nats.
    pub dense_nll: f64,
}

/// The comparison over a run of positions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    /// Scored positions.
    pub positions: usize,
    /// Fraction of positions whose top-1 tokens agree.
    pub top1_agreement: f64,
    /// Mean KL(dense || policy) in nats.
    pub mean_kl: f64,
    /// Largest KL(dense || policy) at any position, in nats.
    pub max_kl: f64,
    /// Perplexity of the targets under the policy.
    pub ppl: f64,
    /// Perplexity of the targets under dense.
    pub dense_ppl: f64,
}

/// Sums [`PositionScore`]s one position at a time, so a long run never needs all
/// its logits in memory at once.
#[derive(Debug, Clone, Default)]
pub struct AgreementAccumulator {
    positions: usize,
    agree: usize,
    kl_sum: f64,
    kl_max: f64,
    nll_sum: f64,
    dense_nll_sum: f64,
}

impl AgreementAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Scores one position (see [`score_position`]) and adds it.
    pub fn push(&mut self, dense: &[f32], policy: &[f32], target: u32) -> Result<PositionScore> {
        let s = score_position(dense, policy, target)?;
        self.positions += 1;
        self.agree += usize::from(s.top1_agrees);
        self.kl_sum += s.kl;
        self.kl_max = self.kl_max.max(s.kl);
        self.nll_sum += s.nll;
        self.dense_nll_sum += s.dense_nll;
        Ok(s)
    }

    /// The aggregate so far; an error if no position was scored.
    pub fn finish(&self) -> Result<Agreement> {
        if self.positions == 0 {
            return Err(Error::InvalidRequest("no positions were scored".into()));
        }
        let n = self.positions as f64;
        Ok(Agreement {
            positions: self.positions,
            top1_agreement: self.agree as f64 / n,
            mean_kl: self.kl_sum / n,
            max_kl: self.kl_max,
            ppl: (self.nll_sum / n).exp(),
            dense_ppl: (self.dense_nll_sum / n).exp(),
        })
    }
}

/// Compares `positions = targets.len()` rows of logits, each `vocab` wide and laid
/// out row after row (`[positions][vocab]`), as the model returns them.
pub fn compare(dense: &[f32], policy: &[f32], vocab: usize, targets: &[u32]) -> Result<Agreement> {
    let want = targets.len() * vocab;
    if vocab == 0 || dense.len() != want || policy.len() != want {
        return Err(Error::InvalidRequest(format!(
            "logits for {} positions of a {vocab}-token vocabulary need {want} values each; got {} (dense) and {} (policy)",
            targets.len(),
            dense.len(),
            policy.len()
        )));
    }
    let mut acc = AgreementAccumulator::new();
    for ((d, p), &t) in dense
        .chunks_exact(vocab)
        .zip(policy.chunks_exact(vocab))
        .zip(targets)
    {
        acc.push(d, p, t)?;
    }
    acc.finish()
}

/// Compares one position's dense and policy logits, with `target` the true next token.
///
/// Errors when the rows differ in length, `target` is outside them, or a row has a
/// NaN or no finite maximum (`-inf` logits are allowed: they are masked tokens).
pub fn score_position(dense: &[f32], policy: &[f32], target: u32) -> Result<PositionScore> {
    same_width(dense, policy)?;
    let t = target as usize;
    if t >= dense.len() {
        return Err(Error::InvalidRequest(format!(
            "target token {target} is outside a vocabulary of {}",
            dense.len()
        )));
    }
    let (d_arg, d_lse) = argmax_logsumexp(dense, "dense")?;
    let (p_arg, p_lse) = argmax_logsumexp(policy, "policy")?;
    Ok(PositionScore {
        top1_agrees: d_arg == p_arg,
        kl: kl_of_shifted(dense, d_lse, policy, p_lse),
        nll: p_lse - f64::from(policy[t]),
        dense_nll: d_lse - f64::from(dense[t]),
    })
}

/// KL(dense || policy) in nats of two rows of logits, as [`score_position`]
/// computes it, with the same errors but no target.
pub fn kl_divergence(dense: &[f32], policy: &[f32]) -> Result<f64> {
    same_width(dense, policy)?;
    let (_, d_lse) = argmax_logsumexp(dense, "dense")?;
    let (_, p_lse) = argmax_logsumexp(policy, "policy")?;
    Ok(kl_of_shifted(dense, d_lse, policy, p_lse))
}

/// An error unless both rows of logits are as wide.
fn same_width(dense: &[f32], policy: &[f32]) -> Result<()> {
    if dense.len() != policy.len() {
        return Err(Error::InvalidRequest(format!(
            "dense logits have {} entries but policy logits {}",
            dense.len(),
            policy.len()
        )));
    }
    Ok(())
}

/// KL(p || q) from logits and their log-sum-exps.
fn kl_of_shifted(dense: &[f32], d_lse: f64, policy: &[f32], p_lse: f64) -> f64 {
    // KL = sum_i p_i (log p_i - log q_i), p_i = exp(d_i - d_lse). Terms with p_i = 0
    // contribute nothing, even where q_i = 0 too.
    let mut kl = 0.0f64;
    for (&d, &q) in dense.iter().zip(policy) {
        let log_p = f64::from(d) - d_lse;
        let p = log_p.exp();
        if p > 0.0 {
            kl += p * (log_p - (f64::from(q) - p_lse));
        }
    }
    // Rounding can leave a tiny negative value where the distributions agree.
    kl.max(0.0)
}

/// The first index of the largest logit and `log(sum(exp(logits)))`, in `f64`.
fn argmax_logsumexp(logits: &[f32], which: &str) -> Result<(usize, f64)> {
    let mut arg = 0;
    let mut max = f32::NEG_INFINITY;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            return Err(Error::InvalidRequest(format!("{which} logit {i} is NaN")));
        }
        if x > max {
            (arg, max) = (i, x);
        }
    }
    if !max.is_finite() {
        return Err(Error::InvalidRequest(format!(
            "{which} logits have no finite maximum (largest: {max})"
        )));
    }
    let m = f64::from(max);
    let sum: f64 = logits.iter().map(|&x| (f64::from(x) - m).exp()).sum();
    Ok((arg, m + sum.ln()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(rng: &mut tandem_kernels::rng::SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.signed_f32() * 8.0).collect()
    }

    #[test]
    fn identical_logits_agree_exactly() {
        let mut rng = tandem_kernels::rng::SplitMix64(7);
        let (vocab, n) = (500, 6);
        let logits: Vec<f32> = (0..n).flat_map(|_| row(&mut rng, vocab)).collect();
        let targets: Vec<u32> = (0..n as u32).map(|i| i * 37 % vocab as u32).collect();
        let a = compare(&logits, &logits, vocab, &targets).unwrap();
        assert_eq!(a.positions, n);
        assert_eq!(a.top1_agreement, 1.0);
        assert!(a.mean_kl < 1e-12 && a.max_kl < 1e-12, "{a:?}");
        assert_eq!(a.ppl, a.dense_ppl);
        assert!(a.ppl > 1.0);
    }

    #[test]
    fn hand_computed_three_token_vocabulary() {
        // dense p = softmax(ln 1, ln 2, ln 1) = (1/4, 1/2, 1/4);
        // policy q = softmax(ln 2, ln 1, ln 1) = (1/2, 1/4, 1/4).
        let dense = [0.0f32, 2f32.ln(), 0.0];
        let policy = [2f32.ln(), 0.0, 0.0];
        let s = score_position(&dense, &policy, 2).unwrap();
        assert!(!s.top1_agrees);
        // KL = 1/4 ln(1/2) + 1/2 ln 2 + 1/4 ln 1 = 1/4 ln 2.
        assert!((s.kl - 0.25 * 2f64.ln()).abs() < 1e-7, "{}", s.kl);
        assert!((s.nll - 4f64.ln()).abs() < 1e-7);
        assert!((s.dense_nll - 4f64.ln()).abs() < 1e-7);
        assert_eq!(kl_divergence(&dense, &policy).unwrap(), s.kl);
        assert!(kl_divergence(&dense, &policy[..2]).is_err());
        assert!(kl_divergence(&dense, &[f32::NAN, 0.0, 0.0]).is_err());

        let mut acc = AgreementAccumulator::new();
        acc.push(&dense, &policy, 1).unwrap(); // q(1) = 1/4, p(1) = 1/2
        acc.push(&dense, &dense, 1).unwrap();
        let a = acc.finish().unwrap();
        assert_eq!(a.top1_agreement, 0.5);
        assert!((a.mean_kl - 0.125 * 2f64.ln()).abs() < 1e-7);
        assert!((a.max_kl - 0.25 * 2f64.ln()).abs() < 1e-7);
        // ppl = exp((ln 4 + ln 2) / 2) = sqrt(8); dense_ppl = exp(ln 2) = 2.
        assert!((a.ppl - 8f64.sqrt()).abs() < 1e-6, "{}", a.ppl);
        assert!((a.dense_ppl - 2.0).abs() < 1e-6);
    }

    #[test]
    fn shifted_logits_have_zero_kl() {
        let mut rng = tandem_kernels::rng::SplitMix64(3);
        let dense = row(&mut rng, 49152);
        for shift in [-100.0f32, 1.5, 1000.0] {
            let policy: Vec<f32> = dense.iter().map(|x| x + shift).collect();
            let s = score_position(&dense, &policy, 5).unwrap();
            assert!(s.top1_agrees);
            // f32 rounding of x + shift perturbs logits by up to ~6e-5 at 1000.
            assert!(s.kl < 1e-8, "shift {shift}: kl {}", s.kl);
            assert!((s.nll - s.dense_nll).abs() < 1e-3);
        }
        // Exactly representable shifts leave the distribution unchanged.
        let dense = [0.5f32, -1.25, 3.0, 2.0];
        let policy: Vec<f32> = dense.iter().map(|x| x + 4.0).collect();
        assert!(score_position(&dense, &policy, 0).unwrap().kl < 1e-12);
    }

    #[test]
    fn masked_tokens_and_bad_input() {
        let ninf = f32::NEG_INFINITY;
        // The policy gives zero probability to a token dense likes: infinite KL.
        let s = score_position(&[1.0, 1.0], &[1.0, ninf], 0).unwrap();
        assert_eq!(s.kl, f64::INFINITY);
        // Zero-probability tokens on both sides contribute nothing.
        let s = score_position(&[1.0, ninf], &[1.0, ninf], 0).unwrap();
        assert_eq!(s.kl, 0.0);
        assert!(score_position(&[1.0, f32::NAN], &[1.0, 1.0], 0).is_err());
        assert!(score_position(&[ninf, ninf], &[1.0, 1.0], 0).is_err());
        assert!(score_position(&[1.0, 2.0], &[1.0, 2.0], 2).is_err());
        assert!(score_position(&[1.0, 2.0], &[1.0], 0).is_err());
        assert!(compare(&[1.0, 2.0], &[1.0, 2.0], 2, &[0, 1]).is_err());
        assert!(AgreementAccumulator::new().finish().is_err());
    }
}
