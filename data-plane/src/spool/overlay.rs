//! What changed since the last checkpoint, in memory. Most of it never reaches redb: a message
//! accepted, answered and finished between two checkpoints, with its stages shipped, leaves no
//! trace here but its idempotency key. What is left at a checkpoint is written to the base in one
//! transaction, and the overlay starts over.

use bytes::Bytes;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Each table's changes: a value put, or `None` for a key the base holds that was deleted.
#[derive(Default)]
pub struct Overlay {
    pub inbox: HashMap<u64, Option<Vec<u8>>>,
    /// Idempotency keys seen (the base forgets them only by pruning).
    pub seen: HashMap<String, i64>,
    /// The base's keys older than this are pruned at the next checkpoint.
    pub prune_seen_before: Option<i64>,
    pub answers: HashMap<String, Option<String>>,
    pub sends: HashMap<String, Option<u8>>,
    pub attempts: HashMap<u64, Option<u32>>,
    /// Stages added, all numbered above the base's.
    pub outbox: BTreeMap<u64, Bytes>,
    /// The base's stages up to this one are shipped: deleted at the next checkpoint.
    pub shipped_through: u64,
    /// The last message and stage numbers the base holds (0 for none): a message numbered above
    /// it was accepted since the checkpoint, so nothing of it is in the base.
    pub base_inbox_last: u64,
    pub base_outbox_last: u64,
    /// Unfinished messages and stages waiting, base and overlay together.
    pub messages: u64,
    pub stages: u64,
}

impl Overlay {
    /// After a checkpoint wrote everything to the base.
    pub fn checkpointed(&mut self, base_inbox_last: u64, base_outbox_last: u64) {
        let (messages, stages) = (self.messages, self.stages);
        *self = Overlay { base_inbox_last, base_outbox_last, messages, stages, ..Overlay::default() };
    }

    /// Whether the base may hold stages after `after` that are not shipped.
    pub fn base_has_stages_after(&self, after: u64) -> bool {
        self.base_outbox_last > after.max(self.shipped_through)
    }

    /// Up to `limit` of the overlay's stages after `after`.
    pub fn stages_after(&self, after: u64, limit: usize) -> Vec<(u64, Bytes)> {
        self.outbox.range(after.saturating_add(1)..).take(limit).map(|(seq, event)| (*seq, event.clone())).collect()
    }

    /// Deletes `key` from one table: gone from the overlay unless the base holds it, then marked
    /// deleted. Returns whether the key had a value.
    pub fn delete<K: Hash + Eq, V>(changes: &mut HashMap<K, Option<V>>, key: K, in_base: bool) -> bool {
        match changes.entry(key) {
            Entry::Occupied(mut entry) => {
                let had = entry.get().is_some();
                if in_base {
                    *entry.get_mut() = None;
                } else {
                    entry.remove();
                }
                had
            }
            Entry::Vacant(entry) => {
                if in_base {
                    entry.insert(None);
                }
                in_base
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletes_leave_a_mark_only_for_what_the_base_holds() {
        let mut changes: HashMap<&str, Option<u8>> = HashMap::new();
        changes.insert("new", Some(1));
        assert!(Overlay::delete(&mut changes, "new", false));
        assert!(!changes.contains_key("new"), "put and deleted since the checkpoint: forgotten");
        changes.insert("old", Some(2));
        assert!(Overlay::delete(&mut changes, "old", true));
        assert_eq!(changes["old"], None, "the base's value is to be deleted at the checkpoint");
        assert!(!Overlay::delete(&mut changes, "old", true), "deleted once only");
        assert!(Overlay::delete(&mut changes, "base only", true));
        assert_eq!(changes["base only"], None);
        assert!(!Overlay::delete(&mut changes, "nowhere", false));
        assert!(!changes.contains_key("nowhere"));
    }
}
