//! Request counters, shared by the HTTP layer and the engine thread.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Counters since the server started.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    in_flight: AtomicUsize,
    active: AtomicUsize,
    peak_active: AtomicUsize,
    received: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

/// How a request ended, for the counters.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Completed,
    /// The client went away.
    Cancelled,
    /// Refused (a bad prompt) or failed in the engine.
    Failed,
}

impl Metrics {
    /// Counts a request in if fewer than `limit` are in flight.
    pub fn try_enter(&self, limit: usize) -> bool {
        self.received.fetch_add(1, Ordering::Relaxed);
        let entered = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        if !entered {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        entered
    }

    pub fn leave(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Sequences in the batch now.
    pub fn set_active(&self, n: usize) {
        self.active.store(n, Ordering::Relaxed);
        self.peak_active.fetch_max(n, Ordering::Relaxed);
    }

    pub fn record(&self, outcome: Outcome, prompt_tokens: usize, completion_tokens: usize) {
        let counter = match outcome {
            Outcome::Completed => &self.completed,
            Outcome::Cancelled => &self.cancelled,
            Outcome::Failed => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion_tokens as u64, Ordering::Relaxed);
    }

    /// The counters as JSON (`GET /metrics`).
    pub fn snapshot(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let active = self.active.load(Ordering::Relaxed);
        serde_json::json!({
            "requests_received": get(&self.received),
            "requests_completed": get(&self.completed),
            "requests_cancelled": get(&self.cancelled),
            "requests_failed": get(&self.failed),
            "requests_refused": get(&self.refused),
            "prompt_tokens": get(&self.prompt_tokens),
            "completion_tokens": get(&self.completion_tokens),
            "sequences_active": active,
            "sequences_peak": self.peak_active.load(Ordering::Relaxed),
            "requests_waiting": in_flight.saturating_sub(active),
        })
    }
}
