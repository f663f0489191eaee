//! The spool's base: its tables in redb, as of the last checkpoint. Written only by a checkpoint
//! (the overlay's changes, in one durable transaction) and by the redo of the log at open.

use super::log::{Change, Round};
use super::overlay::Overlay;
use super::{SpoolError, storage};
use redb::{ReadOnlyTable, ReadTransaction, ReadableTable, TableDefinition};

/// Accepted messages not finished yet: seq → normalized message (JSON).
pub const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("inbox");
/// Channel idempotency keys seen: key → unix ms.
pub const SEEN: TableDefinition<&str, i64> = TableDefinition::new("seen");
/// The agent's answer to an unfinished message: trace id → text, so a restart does not ask again.
pub const ANSWERS: TableDefinition<&str, &str> = TableDefinition::new("answers");
/// Reply chunks: "<trace id>/<chunk>" → SendState.
pub const SENDS: TableDefinition<&str, u8> = TableDefinition::new("sends");
/// Trace stages to ship: seq → encoded TraceEvent.
pub const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// How often an unfinished message was resumed: inbox seq → attempts.
pub const ATTEMPTS: TableDefinition<u64, u32> = TableDefinition::new("attempts");
/// Where the tables stand in the write-ahead log: the last group they hold, then the file and
/// salt of the round after it.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LOG_GROUP: &str = "log";
const LOG_SALT: &str = "log_salt";
const LOG_FILE: &str = "log_file";

/// The tables, open in one write transaction.
pub struct Tables<'t> {
    pub inbox: redb::Table<'t, u64, &'static [u8]>,
    pub seen: redb::Table<'t, &'static str, i64>,
    pub answers: redb::Table<'t, &'static str, &'static str>,
    pub sends: redb::Table<'t, &'static str, u8>,
    pub outbox: redb::Table<'t, u64, &'static [u8]>,
    pub attempts: redb::Table<'t, u64, u32>,
    pub meta: redb::Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    pub fn open(txn: &'t redb::WriteTransaction) -> Result<Tables<'t>, SpoolError> {
        Ok(Tables {
            inbox: txn.open_table(INBOX).map_err(storage)?,
            seen: txn.open_table(SEEN).map_err(storage)?,
            answers: txn.open_table(ANSWERS).map_err(storage)?,
            sends: txn.open_table(SENDS).map_err(storage)?,
            outbox: txn.open_table(OUTBOX).map_err(storage)?,
            attempts: txn.open_table(ATTEMPTS).map_err(storage)?,
            meta: txn.open_table(META).map_err(storage)?,
        })
    }

    fn meta(&self, key: &str) -> Result<u64, SpoolError> {
        self.meta.get(key).map(|v| v.map_or(0, |v| v.value())).map_err(storage)
    }

    /// Where the log goes on after what the tables hold (group 0 in the first file for a new
    /// spool, and for one written before the log had two files).
    pub fn round(&self) -> Result<Round, SpoolError> {
        let file = match self.meta(LOG_FILE)? {
            file @ (0 | 1) => file as usize,
            other => return Err(SpoolError::Storage(format!("the spool's base names log file {other}"))),
        };
        Ok(Round { group: self.meta(LOG_GROUP)?, file, salt: self.meta(LOG_SALT)? })
    }

    /// Records where the log goes on after what the tables hold.
    pub fn record_round(&mut self, round: Round) -> Result<(), SpoolError> {
        self.meta.insert(LOG_GROUP, round.group).map_err(storage)?;
        self.meta.insert(LOG_FILE, round.file as u64).map_err(storage)?;
        self.meta.insert(LOG_SALT, round.salt).map_err(storage)?;
        Ok(())
    }

    /// Redoes one change the log recorded.
    pub fn redo(&mut self, change: &Change<'_>) -> Result<(), SpoolError> {
        let done = match *change {
            Change::InboxPut(seq, message) => self.inbox.insert(seq, message).map(drop),
            Change::InboxDelete(seq) => self.inbox.remove(seq).map(drop),
            Change::SeenPut(key, at) => self.seen.insert(key, at).map(drop),
            Change::SeenPrune(before) => self.seen.retain(|_, at| at >= before),
            Change::AnswerPut(id, text) => self.answers.insert(id, text).map(drop),
            Change::AnswerDelete(id) => self.answers.remove(id).map(drop),
            Change::SendPut(key, state) => self.sends.insert(key, state).map(drop),
            Change::SendDelete(key) => self.sends.remove(key).map(drop),
            Change::OutboxPut(seq, event) => self.outbox.insert(seq, event).map(drop),
            // Stages are shipped oldest first: everything up to `through` is gone.
            Change::OutboxDeleteThrough(through) => self.outbox.retain_in(..=through, |_, _| false),
            Change::AttemptPut(seq, n) => self.attempts.insert(seq, n).map(drop),
            Change::AttemptDelete(seq) => self.attempts.remove(seq).map(drop),
        };
        done.map_err(storage)
    }

    /// Writes what the overlay changed (a checkpoint).
    pub fn write(&mut self, overlay: &Overlay) -> Result<(), SpoolError> {
        let written: redb::Result<()> = (|| {
            for (seq, message) in &overlay.inbox {
                match message {
                    Some(message) => self.inbox.insert(*seq, message.as_slice()).map(drop)?,
                    None => self.inbox.remove(*seq).map(drop)?,
                }
            }
            if let Some(before) = overlay.prune_seen_before {
                self.seen.retain(|_, at| at >= before)?;
            }
            for (key, at) in &overlay.seen {
                self.seen.insert(key.as_str(), *at)?;
            }
            for (id, text) in &overlay.answers {
                match text {
                    Some(text) => self.answers.insert(id.as_str(), text.as_str()).map(drop)?,
                    None => self.answers.remove(id.as_str()).map(drop)?,
                }
            }
            for (key, state) in &overlay.sends {
                match state {
                    Some(state) => self.sends.insert(key.as_str(), *state).map(drop)?,
                    None => self.sends.remove(key.as_str()).map(drop)?,
                }
            }
            for (seq, n) in &overlay.attempts {
                match n {
                    Some(n) => self.attempts.insert(*seq, *n).map(drop)?,
                    None => self.attempts.remove(*seq).map(drop)?,
                }
            }
            if overlay.shipped_through > 0 {
                self.outbox.retain_in(..=overlay.shipped_through, |_, _| false)?;
            }
            for (seq, event) in &overlay.outbox {
                self.outbox.insert(*seq, event.as_ref())?;
            }
            Ok(())
        })();
        written.map_err(storage)
    }

    /// The last inbox and outbox keys (0 for none).
    pub fn last_keys(&self) -> Result<(u64, u64), SpoolError> {
        let last = |table: &redb::Table<'_, u64, &'static [u8]>| {
            table.last().map(|entry| entry.map_or(0, |(k, _)| k.value())).map_err(storage)
        };
        Ok((last(&self.inbox)?, last(&self.outbox)?))
    }

    /// How many messages and stages the tables hold.
    pub fn lens(&self) -> Result<(u64, u64), SpoolError> {
        use redb::ReadableTableMetadata;
        Ok((self.inbox.len().map_err(storage)?, self.outbox.len().map_err(storage)?))
    }
}

/// A read view of the base, as the writer sees it between checkpoints.
pub struct Base {
    pub seen: ReadOnlyTable<&'static str, i64>,
    pub inbox: ReadOnlyTable<u64, &'static [u8]>,
    pub answers: ReadOnlyTable<&'static str, &'static str>,
    pub sends: ReadOnlyTable<&'static str, u8>,
    pub outbox: ReadOnlyTable<u64, &'static [u8]>,
    pub attempts: ReadOnlyTable<u64, u32>,
}

impl Base {
    pub fn open(txn: &ReadTransaction) -> Result<Base, SpoolError> {
        Ok(Base {
            seen: txn.open_table(SEEN).map_err(storage)?,
            inbox: txn.open_table(INBOX).map_err(storage)?,
            answers: txn.open_table(ANSWERS).map_err(storage)?,
            sends: txn.open_table(SENDS).map_err(storage)?,
            outbox: txn.open_table(OUTBOX).map_err(storage)?,
            attempts: txn.open_table(ATTEMPTS).map_err(storage)?,
        })
    }

    pub fn seen(&self, key: &str) -> Result<Option<i64>, SpoolError> {
        Ok(self.seen.get(key).map_err(storage)?.map(|v| v.value()))
    }

    pub fn has_message(&self, seq: u64) -> Result<bool, SpoolError> {
        Ok(self.inbox.get(seq).map_err(storage)?.is_some())
    }

    pub fn has_answer(&self, id: &str) -> Result<bool, SpoolError> {
        Ok(self.answers.get(id).map_err(storage)?.is_some())
    }

    pub fn has_send(&self, key: &str) -> Result<bool, SpoolError> {
        Ok(self.sends.get(key).map_err(storage)?.is_some())
    }

    pub fn attempts(&self, seq: u64) -> Result<Option<u32>, SpoolError> {
        Ok(self.attempts.get(seq).map_err(storage)?.map(|v| v.value()))
    }

    /// How many stages the base holds in `after+1 ..= through`.
    pub fn stages_in(&self, after: u64, through: u64) -> Result<u64, SpoolError> {
        if through <= after {
            return Ok(0);
        }
        let mut n = 0;
        for entry in self.outbox.range(after + 1..=through).map_err(storage)? {
            entry.map_err(storage)?;
            n += 1;
        }
        Ok(n)
    }
}
