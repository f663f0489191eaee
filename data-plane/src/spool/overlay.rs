//! What changed since the last checkpoint, in memory. Most of it never reaches redb: a message
//! accepted, answered and finished between two checkpoints, with its stages shipped, leaves no
//! trace here but its idempotency key. When a checkpoint starts, the overlay is frozen and a new
//! one starts above it; the frozen one is written to the base in one transaction while commits
//! go on, and is read below the new one until that transaction has committed.

use bytes::Bytes;
use std::borrow::Borrow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Arc;

/// The overlays, newest first: the base is below them.
#[derive(Default)]
pub struct Layers {
    /// Every commit changes this one.
    pub live: Overlay,
    /// The one a checkpoint is writing to the base, until that has committed.
    pub frozen: Option<Arc<Overlay>>,
}

impl Layers {
    /// What the overlays say of `key` in one table: `Some(None)` if deleted, `None` if the base
    /// is to tell.
    pub fn find<'a, K, Q, V>(
        &'a self,
        table: impl Fn(&'a Overlay) -> &'a HashMap<K, Option<V>>,
        key: &Q,
    ) -> Option<Option<&'a V>>
    where
        K: Borrow<Q> + Hash + Eq + 'a,
        Q: Hash + Eq + ?Sized,
        V: 'a,
    {
        self.newest_first().find_map(|layer| table(layer).get(key).map(Option::as_ref))
    }

    fn newest_first(&self) -> impl Iterator<Item = &Overlay> {
        std::iter::once(&self.live).chain(self.frozen.as_deref())
    }

    /// Starts a new live overlay above the current one, frozen for a checkpoint to write; the
    /// numbers given are the last message and stage numbers used so far.
    pub fn freeze(&mut self, (inbox_last, outbox_last): (u64, u64)) -> Arc<Overlay> {
        let live = &self.live;
        let next = Overlay {
            // Everything numbered up to here is below the new overlay, in one layer or another.
            base_inbox_last: inbox_last,
            base_outbox_last: outbox_last,
            // The frozen overlay's own stages include none shipped: those it deleted as shipped
            // were the base's, up to here.
            shipped_through: live.shipped_through,
            messages: live.messages,
            stages: live.stages,
            ..Overlay::default()
        };
        let frozen = Arc::new(std::mem::replace(&mut self.live, next));
        self.frozen = Some(frozen.clone());
        frozen
    }

    /// After the frozen overlay's checkpoint committed, with the base's last message and stage
    /// numbers: the base holds what it held.
    pub fn checkpointed(&mut self, (inbox_last, outbox_last): (u64, u64)) {
        self.frozen = None;
        let live = &mut self.live;
        // Numbers above the base's last were used by what was since deleted: nothing to find.
        live.base_inbox_last = live.base_inbox_last.min(inbox_last);
        live.base_outbox_last = live.base_outbox_last.min(outbox_last);
        live.shipped_through = live.shipped_through.min(live.base_outbox_last);
    }

    /// The messages deleted in the overlays (the base may still hold them).
    pub fn deleted_messages(&self) -> impl Iterator<Item = u64> + '_ {
        self.newest_first().flat_map(|layer| layer.inbox.iter().filter(|(_, m)| m.is_none()).map(|(seq, _)| *seq))
    }

    /// Whether the layers below the live overlay may hold stages after `after` that are not
    /// shipped.
    pub fn below_has_stages_after(&self, after: u64) -> bool {
        self.live.base_outbox_last > after.max(self.live.shipped_through)
    }

    /// The frozen overlay's stages after `after` not yet shipped, up to `limit`.
    pub fn frozen_stages_after(&self, after: u64, limit: usize) -> Vec<(u64, Bytes)> {
        let after = after.max(self.live.shipped_through);
        self.frozen.as_ref().map_or_else(Vec::new, |frozen| frozen.stages_after(after, limit))
    }

    /// Where the base's stages not yet shipped start: the overlays' shipped marks, both.
    pub fn base_shipped_through(&self) -> u64 {
        self.live.shipped_through.max(self.frozen.as_ref().map_or(0, |f| f.shipped_through))
    }

    /// The idempotency keys older than this are forgotten, wherever they are below the live overlay.
    pub fn prune_seen_before(&self) -> Option<i64> {
        let frozen = self.frozen.as_ref().and_then(|f| f.prune_seen_before);
        self.live.prune_seen_before.max(frozen)
    }
}

/// Each table's changes: a value put, or `None` for a key held below (in the base, or in a
/// frozen overlay under this one) that was deleted.
#[derive(Default)]
pub struct Overlay {
    pub inbox: HashMap<u64, Option<Vec<u8>>>,
    /// Idempotency keys seen (the base forgets them only by pruning).
    pub seen: HashMap<String, i64>,
    /// The keys held below older than this are pruned when this overlay is checkpointed.
    pub prune_seen_before: Option<i64>,
    pub answers: HashMap<String, Option<String>>,
    pub sends: HashMap<String, Option<u8>>,
    pub attempts: HashMap<u64, Option<u32>>,
    /// Stages added, all numbered above those held below.
    pub outbox: BTreeMap<u64, Bytes>,
    /// The stages held below up to this one are shipped: deleted when this overlay is
    /// checkpointed.
    pub shipped_through: u64,
    /// The last message and stage numbers held below (0 for none): a message numbered above it
    /// was accepted since this overlay started, so nothing of it is below.
    pub base_inbox_last: u64,
    pub base_outbox_last: u64,
    /// Unfinished messages and stages waiting, base and overlay together.
    pub messages: u64,
    pub stages: u64,
}

impl Overlay {
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
