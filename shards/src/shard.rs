//! The shard state machine. (API fixed; implementation in progress.)

use storage::{Journal, Record, SegmentId};

use crate::{Action, Config, Event, ShardStats};

/// One shard's state.
pub struct Shard {
    config: Config,
    actions: Vec<Action>,
    stats: ShardStats,
    poisoned: Option<String>,
}

impl Shard {
    /// A fresh shard; `seed` drives the only randomness (registration codes).
    pub fn new(config: Config, seed: u64) -> Self {
        let _ = seed;
        Self { config, actions: Vec::new(), stats: ShardStats::default(), poisoned: None }
    }

    /// Rebuilds state from the recovered log before any event is handled.
    pub fn recover(&mut self, now_ms: u64, segments: &[SegmentId], records: impl IntoIterator<Item = (SegmentId, Record)>) {
        let _ = (now_ms, segments, records.into_iter().count());
    }

    /// Handles one event at `now_ms`; appends go through `journal`.
    pub fn handle(&mut self, now_ms: u64, event: Event, journal: &mut dyn Journal) {
        let _ = (now_ms, event, journal, &self.config);
    }

    /// Takes the actions produced so far, in order.
    pub fn drain_actions(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }

    /// Counters.
    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }

    /// Why the shard refuses writes, if it does.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }
}
