//! How many decisions each source made. A degraded node answers as a healthy
//! one would (that is the point of the fallback), so an operator, or a test,
//! that needs to know whether limits were really shared reads these counts.

use std::sync::atomic::{AtomicU64, Ordering};

/// Decisions made so far, by where they were made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Decided by Redis (shared by every node).
    pub redis: u64,
    /// Decided in process while Redis was configured but failing or not yet
    /// connected (this node's share).
    pub degraded: u64,
    /// Decided in process with no Redis configured.
    pub in_process: u64,
}

#[derive(Debug, Default)]
pub struct DecisionTally {
    redis: AtomicU64,
    degraded: AtomicU64,
    in_process: AtomicU64,
}

impl DecisionTally {
    pub(crate) fn redis(&self) {
        self.redis.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn degraded(&self) {
        self.degraded.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn in_process(&self) {
        self.in_process.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> Tally {
        Tally {
            redis: self.redis.load(Ordering::Relaxed),
            degraded: self.degraded.load(Ordering::Relaxed),
            in_process: self.in_process.load(Ordering::Relaxed),
        }
    }
}
