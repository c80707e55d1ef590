//! Every Redis key name of a scheduler. No other module formats a key.
//!
//! All keys of scheduler `N` look like `{prefix}:{N}:...`: the hash tag `{N}` puts
//! them in one Redis Cluster slot, so every script can run there.

/// The key names of one scheduler.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    /// `{prefix}:{name}:`, the start of every key.
    base: String,
    /// SET of the ids of idle slots.
    pub(crate) idle: String,
    /// ZSET slot id -> deadline (busy) or reclaim time (stopping), in ms.
    pub(crate) deadlines: String,
    /// HASH task id -> slot id, for the tasks that hold a slot.
    pub(crate) tasks: String,
    /// ZSET task id -> time it ended, in ms, for recently ended tasks.
    pub(crate) ended: String,
    /// STRING, the last lease number handed out.
    pub(crate) lease: String,
    /// HASH naming the current life of the state (data-loss detection).
    pub(crate) epoch: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, name: &str) -> Self {
        let base = format!("{prefix}:{{{name}}}:");
        Keys {
            idle: format!("{base}idle"),
            deadlines: format!("{base}deadlines"),
            tasks: format!("{base}tasks"),
            ended: format!("{base}ended"),
            lease: format!("{base}lease"),
            epoch: format!("{base}epoch"),
            base,
        }
    }

    /// HASH holding the state of one slot.
    pub(crate) fn slot(&self, slot_id: &str) -> String {
        format!("{}slot:{slot_id}", self.base)
    }

    /// The glob pattern matching every slot hash (there is no registry of slots: the
    /// hashes are it).
    pub(crate) fn slot_pattern(&self) -> String {
        format!("{}slot:*", self.base)
    }

    /// The slot id in a key that matches [`Keys::slot_pattern`].
    pub(crate) fn slot_id_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.base)?.strip_prefix("slot:")
    }

    /// The glob pattern matching every key of the scheduler (for operators' `SCAN`).
    pub(crate) fn pattern(&self) -> String {
        format!("{}*", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::Keys;

    #[test]
    /// Every key carries the scheduler's hash tag.
    fn keys_share_the_hash_tag() {
        let k = Keys::new("task_semaphore", "jobs");
        for key in [&k.idle, &k.deadlines, &k.tasks, &k.ended, &k.lease, &k.slot("1")] {
            assert!(key.starts_with("task_semaphore:{jobs}:"), "{key}");
        }
        assert_eq!(k.slot("eu-2"), "task_semaphore:{jobs}:slot:eu-2");
        assert_eq!(k.pattern(), "task_semaphore:{jobs}:*");
        assert_eq!(k.slot_pattern(), "task_semaphore:{jobs}:slot:*");
        assert_eq!(k.slot_id_of(&k.slot("a:b*")), Some("a:b*"));
        assert_eq!(k.slot_id_of("task_semaphore:{jobs}:idle"), None);
    }
}
