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
    /// ZSET group id -> a bound (ms) no later than any time in that group of the
    /// deadline index (see [`Keys::group`]).
    pub(crate) deadlines: String,
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

    /// HASH task id -> slot id: the bucket of the task index that holds `task_id`'s
    /// entry, out of `buckets` (the epoch's `task_buckets`).
    pub(crate) fn task_bucket(&self, task_id: &str, buckets: u32) -> String {
        format!("{}tasks:{}", self.base, bucket_of(task_id, buckets))
    }

    /// The group of the deadline index that holds `slot_id`'s time, out of `buckets`
    /// (the epoch's `task_buckets`): its id (the member in `deadlines`) and its key, a
    /// HASH slot id -> deadline (busy) or reclaim time (stopping), in ms.
    pub(crate) fn group(&self, slot_id: &str, buckets: u32) -> (u64, String) {
        let id = bucket_of(slot_id, buckets);
        (id, self.group_key(id))
    }

    /// The key of group `id` of the deadline index.
    pub(crate) fn group_key(&self, id: u64) -> String {
        format!("{}due:{id}", self.base)
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

/// The bucket of the task index that holds `task_id` (or the group of the deadline
/// index that holds a slot id): FNV-1a (64 bits) of its bytes, modulo `buckets` (a
/// power of two). Every replica, and every version of the crate,
/// must compute the same bucket: the README documents this function.
pub(crate) fn bucket_of(task_id: &str, buckets: u32) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in task_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash & (u64::from(buckets.max(1)) - 1)
}

/// Task buckets for a new state of `slots` slots: about 16 to 32 tasks a bucket when
/// every slot is busy, so that each bucket stays a small listpack in Redis (128
/// entries at most by default).
pub(crate) fn buckets_for(slots: usize) -> u32 {
    let wanted = slots.div_ceil(32).clamp(1, MAX_BUCKETS as usize);
    (wanted as u32).next_power_of_two().min(MAX_BUCKETS)
}

/// The most task buckets (epoch.lua checks the same bound).
pub(crate) const MAX_BUCKETS: u32 = 65_536;

#[cfg(test)]
mod tests {
    use super::{bucket_of, buckets_for, Keys};

    #[test]
    /// Every key carries the scheduler's hash tag.
    fn keys_share_the_hash_tag() {
        let k = Keys::new("task_semaphore", "jobs");
        for key in [
            &k.idle,
            &k.deadlines,
            &k.task_bucket("t", 64),
            &k.ended,
            &k.lease,
            &k.slot("1"),
        ] {
            assert!(key.starts_with("task_semaphore:{jobs}:"), "{key}");
        }
        assert_eq!(k.slot("eu-2"), "task_semaphore:{jobs}:slot:eu-2");
        assert_eq!(k.group("eu-2", 1), (0, "task_semaphore:{jobs}:due:0".to_owned()));
        assert_eq!(k.pattern(), "task_semaphore:{jobs}:*");
        assert_eq!(k.slot_pattern(), "task_semaphore:{jobs}:slot:*");
        assert_eq!(k.slot_id_of(&k.slot("a:b*")), Some("a:b*"));
        assert_eq!(k.slot_id_of("task_semaphore:{jobs}:idle"), None);
    }

    #[test]
    /// The bucket function is FNV-1a 64 (published values), and stays inside the count.
    fn buckets_are_fnv1a() {
        assert_eq!(bucket_of("", 1 << 16), 0xcbf2_9ce4_8422_2325 & 0xffff);
        assert_eq!(bucket_of("a", 1 << 16), 0xaf63_dc4c_8601_ec8c & 0xffff);
        assert_eq!(bucket_of("foobar", 1 << 16), 0x8594_4171_f739_67e8 & 0xffff);
        assert_eq!(bucket_of("anything", 1), 0);
        assert!((0..1000).all(|i| bucket_of(&i.to_string(), 32) < 32));
        assert_eq!(buckets_for(0), 1);
        assert_eq!(buckets_for(32), 1);
        assert_eq!(buckets_for(33), 2);
        assert_eq!(buckets_for(10_000), 512);
        assert_eq!(buckets_for(100_000), 4096);
        assert_eq!(buckets_for(usize::MAX), 65_536);
    }
}
