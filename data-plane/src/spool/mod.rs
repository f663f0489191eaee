//! The node's durable local state: messages accepted but not finished, what was already sent
//! for them, and trace stages waiting to be shipped.
//!
//! One redb database, written by one thread. Callers hand it operations and (but for deferred
//! ones, below) wait for the commit; operations that arrive together share one transaction and
//! one flush (group commit), which is what lets a webhook be durable before its 2xx without one
//! disk flush per message. Dedupe is checked and recorded in the same transaction that accepts a
//! message, so a redelivery racing the original is still caught.
//!
//! A transaction is made durable by its changes, appended to a write-ahead log ([`log`]) and
//! flushed; the tables are committed to redb without a flush of their own. redb's durable commit
//! rewrites every page a transaction touched and flushes twice, which cost more than everything
//! else the node does per message; it now happens once per checkpoint ([`CHECKPOINT_EVERY`], or
//! when the log fills), after which the log starts over. A restart redoes the log's frames after
//! the last checkpoint.
//!
//! Only what must be on disk before something leaves the node waits for a commit: an accepted
//! message (before its 2xx) and the intent to send a chunk (before the send). What follows an
//! external effect (a message finished, trace stages shipped) is deferred: it joins the next
//! commit, or is committed on its own [`DEFER_AT_MOST`] later (to the tables only: it reaches
//! the disk with the next checkpoint), so under load it costs no transaction of its own. Losing
//! it in a crash repeats no send: the message is resumed, its chunk found with an intent only and
//! reported as of unknown outcome; shipped stages are shipped again and the control plane stores
//! each once.

mod log;

use log::{Change, Frame, Log};
use omni_core::metrics::Histogram;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{Notify, oneshot};

/// Accepted messages not finished yet: seq → normalized message (JSON).
const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("inbox");
/// Channel idempotency keys seen: key → unix ms.
const SEEN: TableDefinition<&str, i64> = TableDefinition::new("seen");
/// The agent's answer to an unfinished message: trace id → text, so a restart does not ask again.
const ANSWERS: TableDefinition<&str, &str> = TableDefinition::new("answers");
/// Reply chunks: "<trace id>/<chunk>" → SendState.
const SENDS: TableDefinition<&str, u8> = TableDefinition::new("sends");
/// Trace stages to ship: seq → encoded TraceEvent.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// How often an unfinished message was resumed: inbox seq → attempts.
const ATTEMPTS: TableDefinition<u64, u32> = TableDefinition::new("attempts");
/// Where the tables stand in the write-ahead log: the last group they hold, the round's salt.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LOG_GROUP: &str = "log";
const LOG_SALT: &str = "log_salt";

const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Operations committed per transaction at most; more wait for the next one.
const MAX_GROUP: usize = 1024;

/// Commit times are mostly an fsync: finer buckets than request latencies.
const SPOOL_COMMIT_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5];

/// Deferred operations are committed at most this long after the first of them.
pub const DEFER_AT_MOST: Duration = Duration::from_millis(5);

/// The tables are made durable (and the log started over) at most this long after a change.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum SpoolError {
    #[error("spool storage: {0}")]
    Storage(String),
    #[error("the spool writer has stopped")]
    Stopped,
}

fn storage(e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Storage(e.to_string())
}

/// What is known about one reply chunk. A chunk with only an intent after a crash may or may
/// not have reached the user: it is never sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendState {
    Intent = 1,
    Sent = 2,
    Failed = 3,
}

impl SendState {
    fn from_u8(value: u8) -> Option<SendState> {
        match value {
            1 => Some(SendState::Intent),
            2 => Some(SendState::Sent),
            3 => Some(SendState::Failed),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub enum Op {
    /// Accept a message (and append its first trace stages) unless `dedupe_key` was seen.
    Accept {
        dedupe_key: String,
        now_ms: i64,
        message: Vec<u8>,
        trace: Vec<Vec<u8>>,
    },
    /// Append trace stages.
    Trace(Vec<Vec<u8>>),
    Answer {
        id: String,
        text: String,
    },
    Send {
        id: String,
        chunk: u32,
        state: SendState,
    },
    /// A message is finished: forget it, its answer and its chunk states.
    Finish {
        seq: u64,
        id: String,
        chunks: u32,
    },
    /// Trace stages shipped: every stage up to this one.
    Shipped {
        through: u64,
    },
    /// Forget idempotency keys older than this.
    PruneSeen {
        before_ms: i64,
    },
    /// A message is being resumed after a restart: count the attempt.
    Resume {
        seq: u64,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted {
        seq: u64,
    },
    Duplicate,
    /// The number of this resumption (1 for the first).
    Attempt(u32),
    Done,
}

struct Request {
    ops: Vec<Op>,
    /// `None` for deferred operations: nobody waits for them.
    reply: Option<oneshot::Sender<Result<Vec<Outcome>, SpoolError>>>,
}

#[derive(Clone)]
pub struct Spool {
    db: Arc<Database>,
    requests: mpsc::Sender<Request>,
    /// Woken after a commit that added trace stages.
    traces_added: Arc<Notify>,
    /// How long each transaction took to commit (flush included).
    pub commits: Arc<Histogram>,
    /// How long each checkpoint took (also counted in `commits`): requests arriving meanwhile wait.
    pub checkpoints: Arc<Histogram>,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

fn chunk_key(id: &str, chunk: u32) -> String {
    format!("{id}/{chunk}")
}

impl Spool {
    /// Opens (creating) the spool file and its log beside it (`<path>.log`), redoes what the
    /// log holds after the last checkpoint, and starts the writer thread.
    pub fn open(path: &Path) -> Result<Spool, SpoolError> {
        // Created owner-only before redb opens it (redb takes an empty file as a new database).
        std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(path).map_err(storage)?;
        // The spool's working set is small (unfinished messages and unshipped stages); redb's
        // default cache would grow far beyond it.
        let db = Arc::new(redb::Builder::new().set_cache_size(CACHE_BYTES).create(path).map_err(storage)?);
        let txn = db.begin_write().map_err(storage)?;
        // Redone and checkpointed in one transaction, which starts a new round of the log.
        let salt = log::new_salt();
        let mut log = {
            let mut tables = Tables::open(&txn, Next::default())?;
            let meta = |key| tables.meta.get(key).map(|v| v.map_or(0, |v| v.value())).map_err(storage);
            let (checkpointed, round) = (meta(LOG_GROUP)?, meta(LOG_SALT)?);
            let (log, frames) = Log::open(&path.with_extension("log"), checkpointed, round).map_err(storage)?;
            for frame in &frames {
                let changes = Change::decode_all(frame)
                    .ok_or_else(|| SpoolError::Storage("unreadable change in the spool log".into()))?;
                for change in changes {
                    tables.apply_change(&change)?;
                }
            }
            if !frames.is_empty() {
                tracing::info!(groups = frames.len(), "spool: redid what the log held after the last checkpoint");
            }
            tables.meta.insert(LOG_GROUP, log.group).map_err(storage)?;
            tables.meta.insert(LOG_SALT, salt).map_err(storage)?;
            log
        };
        txn.commit().map_err(storage)?;
        log.restart(salt);
        // Unbounded: callers of `commit` wait for their reply, and deferred operations follow
        // committed ones (a finish follows an accept), so what waits is bounded by the work.
        let (requests, rx) = mpsc::channel();
        let (writer_db, traces_added) = (db.clone(), Arc::new(Notify::new()));
        let timings = Timings {
            commits: Arc::new(Histogram::new(SPOOL_COMMIT_BUCKETS)),
            checkpoints: Arc::new(Histogram::new(SPOOL_COMMIT_BUCKETS)),
        };
        let (wake, timed) = (traces_added.clone(), timings.clone());
        let handle = std::thread::Builder::new()
            .name("omni-spool".into())
            .spawn(move || writer(writer_db, log, rx, &wake, &timed))
            .map_err(storage)?;
        Ok(Spool {
            db,
            requests,
            traces_added,
            commits: timings.commits,
            checkpoints: timings.checkpoints,
            writer: Arc::new(std::sync::Mutex::new(Some(handle))),
        })
    }

    /// Stops the writer once every other handle is gone, and waits for it to release the file.
    pub async fn close(self) {
        let Spool { db, requests, writer, .. } = self;
        drop(requests);
        drop(db);
        let handle = writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }

    /// Commits `ops` (with whatever else is pending) and returns one outcome per op once they
    /// are on disk.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, SpoolError> {
        let (reply, done) = oneshot::channel();
        self.requests.send(Request { ops, reply: Some(reply) }).map_err(|_| SpoolError::Stopped)?;
        done.await.map_err(|_| SpoolError::Stopped)?
    }

    /// Notified after each commit that added trace stages to the outbox.
    pub fn traces_added(&self) -> Arc<Notify> {
        self.traces_added.clone()
    }

    /// Commits whatever is deferred now (before the process exits, say).
    pub async fn flush(&self) -> Result<(), SpoolError> {
        self.commit(Vec::new()).await.map(drop)
    }

    /// Hands `ops` over to be committed with the next commit, or within [`DEFER_AT_MOST`]; for
    /// what may be lost in a crash without harm. Not readable before that.
    pub fn defer(&self, ops: Vec<Op>) -> Result<(), SpoolError> {
        self.requests.send(Request { ops, reply: None }).map_err(|_| SpoolError::Stopped)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, SpoolError> + Send + 'static,
    ) -> Result<T, SpoolError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(storage)?
    }

    /// Every unfinished message, oldest first.
    pub async fn unfinished(&self) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(INBOX).map_err(storage)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(storage)? {
                let (seq, message) = entry.map_err(storage)?;
                out.push((seq.value(), message.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    pub async fn answer(&self, id: &str) -> Result<Option<String>, SpoolError> {
        let id = id.to_owned();
        self.read(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(ANSWERS).map_err(storage)?;
            Ok(table.get(id.as_str()).map_err(storage)?.map(|v| v.value().to_owned()))
        })
        .await
    }

    pub async fn send_state(&self, id: &str, chunk: u32) -> Result<Option<SendState>, SpoolError> {
        let key = chunk_key(id, chunk);
        self.read(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(SENDS).map_err(storage)?;
            Ok(table.get(key.as_str()).map_err(storage)?.and_then(|v| SendState::from_u8(v.value())))
        })
        .await
    }

    /// Up to `limit` trace stages after stage `after`, oldest first.
    pub async fn outbox(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(OUTBOX).map_err(storage)?;
            let mut out = Vec::new();
            for entry in table.range(after.saturating_add(1)..).map_err(storage)?.take(limit) {
                let (seq, event) = entry.map_err(storage)?;
                out.push((seq.value(), event.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    /// (unfinished messages, trace stages waiting), for metrics.
    pub async fn depths(&self) -> Result<(u64, u64), SpoolError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let inbox = txn.open_table(INBOX).map_err(storage)?.len().map_err(storage)?;
            let outbox = txn.open_table(OUTBOX).map_err(storage)?.len().map_err(storage)?;
            Ok((inbox, outbox))
        })
        .await
    }
}

fn next_key(table: &impl ReadableTable<u64, &'static [u8]>) -> Result<u64, SpoolError> {
    Ok(table.last().map_err(storage)?.map_or(1, |(k, _)| k.value() + 1))
}

/// What the writer times.
#[derive(Clone)]
struct Timings {
    commits: Arc<Histogram>,
    checkpoints: Arc<Histogram>,
}

/// When the writer must act without being asked: deferred operations due, a checkpoint due.
#[derive(Default)]
struct Due {
    deferred_since: Option<Instant>,
    /// The first change not yet made durable by a checkpoint.
    unchecked_since: Option<Instant>,
}

impl Due {
    fn next(&self) -> Option<Instant> {
        let deferred = self.deferred_since.map(|t| t + DEFER_AT_MOST);
        let checkpoint = self.unchecked_since.map(|t| t + CHECKPOINT_EVERY);
        deferred.into_iter().chain(checkpoint).min()
    }
}

/// The writer thread: takes whatever requests are waiting, applies them after the deferred
/// operations in one transaction, makes it durable (a log frame, or a checkpoint), then answers
/// them all. Deferred operations alone wait up to [`DEFER_AT_MOST`] for company before they are
/// committed by themselves.
fn writer(db: Arc<Database>, mut log: Log, rx: mpsc::Receiver<Request>, traces_added: &Notify, timings: &Timings) {
    let mut next = Next::default();
    let mut deferred: Vec<Op> = Vec::new();
    let mut due = Due::default();
    loop {
        let received = match due.next() {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        let mut group = match received {
            Ok(first) => vec![first],
            Err(mpsc::RecvTimeoutError::Timeout) => Vec::new(),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut ops = deferred.len() + group.iter().map(|r| r.ops.len()).sum::<usize>();
        while ops < MAX_GROUP {
            match rx.try_recv() {
                Ok(next) => {
                    ops += next.ops.len();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        group.retain_mut(|request| {
            if request.reply.is_some() {
                return true;
            }
            deferred.append(&mut request.ops);
            due.deferred_since.get_or_insert_with(Instant::now);
            false
        });
        let now = Instant::now();
        let deferred_due = due.deferred_since.is_some_and(|since| now >= since + DEFER_AT_MOST);
        let checkpoint = log.offset >= log::CHECKPOINT_BYTES
            || due.unchecked_since.is_some_and(|since| now >= since + CHECKPOINT_EVERY);
        if group.is_empty() && !deferred_due && !checkpoint {
            continue;
        }
        due.deferred_since = None;
        let started = Instant::now();
        let mut applied = apply(&db, &mut log, &mut next, &deferred, &group, checkpoint);
        if let Err(e) = &applied
            && !deferred.is_empty()
        {
            // Whatever failed, the waiting requests are not to fail for operations nobody waits
            // for: those are dropped (a crash would have lost them too), the requests tried alone.
            tracing::error!(error = %e, dropped = deferred.len(), "deferred spool operations failed");
            deferred.clear();
            applied = apply(&db, &mut log, &mut next, &[], &group, checkpoint);
        }
        deferred.clear();
        timings.commits.observe(started.elapsed());
        if checkpoint {
            timings.checkpoints.observe(started.elapsed());
        }
        match applied {
            Ok((outcomes, changed)) => {
                if checkpoint {
                    due.unchecked_since = None;
                } else if changed.any {
                    due.unchecked_since.get_or_insert(started);
                }
                if changed.traces {
                    traces_added.notify_one();
                }
                for (request, outcome) in group.into_iter().zip(outcomes) {
                    request.reply.map(|reply| reply.send(Ok(outcome)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "spool commit failed");
                // Not again at once: redb may refuse every transaction until reopened, and a
                // due checkpoint would otherwise be retried in a busy loop.
                due.unchecked_since = Some(Instant::now());
                for request in group {
                    request.reply.map(|reply| reply.send(Err(SpoolError::Storage(e.to_string()))));
                }
            }
        }
    }
    // Closing: whatever is deferred, and a last checkpoint, so the next start has nothing to redo.
    if let Err(e) = apply(&db, &mut log, &mut next, &deferred, &[], true) {
        tracing::error!(error = %e, "spool commit failed at close");
    }
}

/// The next keys of the inbox and the outbox. Kept across transactions, so that a key is never
/// used twice in one run even when its table empties: the shipper reads on from the last stage
/// it shipped, and a reused stage number would be skipped.
#[derive(Default, Clone, Copy)]
struct Next {
    inbox: u64,
    outbox: u64,
}

/// The spool's tables, open in one write transaction, and the changes made to them so far
/// (encoded for the log).
struct Tables<'t> {
    inbox: redb::Table<'t, u64, &'static [u8]>,
    seen: redb::Table<'t, &'static str, i64>,
    answers: redb::Table<'t, &'static str, &'static str>,
    sends: redb::Table<'t, &'static str, u8>,
    outbox: redb::Table<'t, u64, &'static [u8]>,
    attempts: redb::Table<'t, u64, u32>,
    meta: redb::Table<'t, &'static str, u64>,
    next_inbox: u64,
    next_outbox: u64,
    changes: Frame,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t redb::WriteTransaction, next: Next) -> Result<Tables<'t>, SpoolError> {
        let inbox = txn.open_table(INBOX).map_err(storage)?;
        let outbox = txn.open_table(OUTBOX).map_err(storage)?;
        Ok(Tables {
            next_inbox: next_key(&inbox)?.max(next.inbox),
            next_outbox: next_key(&outbox)?.max(next.outbox),
            inbox,
            outbox,
            seen: txn.open_table(SEEN).map_err(storage)?,
            answers: txn.open_table(ANSWERS).map_err(storage)?,
            sends: txn.open_table(SENDS).map_err(storage)?,
            attempts: txn.open_table(ATTEMPTS).map_err(storage)?,
            meta: txn.open_table(META).map_err(storage)?,
            changes: Frame::default(),
        })
    }

    /// Makes `change` to the tables (and nothing else: the log is redone through here).
    fn apply_change(&mut self, change: &Change<'_>) -> Result<(), SpoolError> {
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

    /// Makes `change` and records it for the log.
    fn change(&mut self, change: Change<'_>) -> Result<(), SpoolError> {
        self.apply_change(&change)?;
        self.changes.push(&change);
        Ok(())
    }

    fn append(&mut self, events: &[Vec<u8>]) -> Result<(), SpoolError> {
        for event in events {
            self.change(Change::OutboxPut(self.next_outbox, event))?;
            self.next_outbox += 1;
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<Outcome, SpoolError> {
        Ok(match *op {
            Op::Accept { ref dedupe_key, now_ms, ref message, ref trace } => {
                if self.seen.get(dedupe_key.as_str()).map_err(storage)?.is_some() {
                    Outcome::Duplicate
                } else {
                    self.change(Change::SeenPut(dedupe_key, now_ms))?;
                    let seq = self.next_inbox;
                    self.next_inbox += 1;
                    self.change(Change::InboxPut(seq, message))?;
                    self.append(trace)?;
                    Outcome::Accepted { seq }
                }
            }
            Op::Trace(ref events) => {
                self.append(events)?;
                Outcome::Done
            }
            Op::Answer { ref id, ref text } => {
                self.change(Change::AnswerPut(id, text))?;
                Outcome::Done
            }
            Op::Send { ref id, chunk, state } => {
                self.change(Change::SendPut(&chunk_key(id, chunk), state as u8))?;
                Outcome::Done
            }
            Op::Resume { seq } => {
                let n = self.attempts.get(seq).map_err(storage)?.map_or(0, |v| v.value()) + 1;
                self.change(Change::AttemptPut(seq, n))?;
                Outcome::Attempt(n)
            }
            Op::Finish { seq, ref id, chunks } => {
                self.change(Change::InboxDelete(seq))?;
                self.change(Change::AttemptDelete(seq))?;
                self.change(Change::AnswerDelete(id))?;
                for chunk in 0..chunks {
                    self.change(Change::SendDelete(&chunk_key(id, chunk)))?;
                }
                Outcome::Done
            }
            Op::Shipped { through } => {
                self.change(Change::OutboxDeleteThrough(through))?;
                Outcome::Done
            }
            Op::PruneSeen { before_ms } => {
                self.change(Change::SeenPrune(before_ms))?;
                Outcome::Done
            }
        })
    }
}

/// What a transaction changed: anything at all, trace stages in particular.
struct Changed {
    any: bool,
    traces: bool,
}

/// One transaction: the deferred operations, then each request's, one outcome per op; and what
/// changed.
type Applied = (Vec<Vec<Outcome>>, Changed);

/// Applies the operations in one transaction and commits it: durably if `checkpoint` (and the
/// log starts over), else to the tables only, with the changes made durable in the log first
/// when a request waits for them. Deferred operations alone are not logged: they may be lost.
fn apply(
    db: &Database,
    log: &mut Log,
    next: &mut Next,
    deferred: &[Op],
    group: &[Request],
    checkpoint: bool,
) -> Result<Applied, SpoolError> {
    let mut txn = db.begin_write().map_err(storage)?;
    if !checkpoint {
        txn.set_durability(Durability::None).map_err(storage)?;
    }
    let salt = checkpoint.then(log::new_salt);
    let logged_before = (log.offset, log.group);
    let mut all = Vec::with_capacity(group.len());
    let (changed, after) = {
        let mut tables = Tables::open(&txn, *next)?;
        let first_outbox = tables.next_outbox;
        for op in deferred {
            tables.apply(op)?;
        }
        for request in group {
            let outcomes = request.ops.iter().map(|op| tables.apply(op)).collect::<Result<Vec<_>, _>>()?;
            all.push(outcomes);
        }
        let changed = Changed { any: !tables.changes.is_empty(), traces: tables.next_outbox > first_outbox };
        if let Some(salt) = salt {
            tables.meta.insert(LOG_SALT, salt).map_err(storage)?;
        } else if changed.any && !group.is_empty() {
            // The tables record the frame's group; a failed append drops the transaction.
            tables.meta.insert(LOG_GROUP, log.group + 1).map_err(storage)?;
            log.append(&mut tables.changes).map_err(storage)?;
        }
        (changed, Next { inbox: tables.next_inbox, outbox: tables.next_outbox })
    };
    if let Err(e) = txn.commit() {
        // The frame's callers hear of a failure: the next frame takes its place, so that its
        // inbox and stage numbers (reused, as `next` did not move) are never redone twice.
        (log.offset, log.group) = logged_before;
        return Err(storage(e));
    }
    if let Some(salt) = salt {
        log.restart(salt);
    }
    *next = after;
    Ok((all, changed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(key: &str, message: &str) -> Op {
        Op::Accept {
            dedupe_key: key.into(),
            now_ms: 1000,
            message: message.as_bytes().to_vec(),
            trace: vec![b"received".to_vec()],
        }
    }

    #[tokio::test]
    async fn accept_dedupe_finish_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        {
            let spool = Spool::open(&path).unwrap();
            let outcomes =
                spool.commit(vec![accept("k1", "m1"), accept("k1", "m1 again"), accept("k2", "m2")]).await.unwrap();
            assert_eq!(outcomes, [Outcome::Accepted { seq: 1 }, Outcome::Duplicate, Outcome::Accepted { seq: 2 }]);
            spool.commit(vec![Op::Answer { id: "t1".into(), text: "hi".into() }]).await.unwrap();
            spool.commit(vec![Op::Send { id: "t1".into(), chunk: 0, state: SendState::Intent }]).await.unwrap();
            spool.commit(vec![Op::Finish { seq: 2, id: "t2".into(), chunks: 0 }]).await.unwrap();
            spool.close().await;
        }
        // Everything committed is there after a reopen (as after a crash).
        let spool = Spool::open(&path).unwrap();
        for file in ["spool.redb", "spool.log"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file} is owner-only");
        }
        let unfinished = spool.unfinished().await.unwrap();
        assert_eq!(unfinished, vec![(1, b"m1".to_vec())]);
        assert_eq!(spool.answer("t1").await.unwrap().as_deref(), Some("hi"));
        assert_eq!(spool.send_state("t1", 0).await.unwrap(), Some(SendState::Intent));
        assert_eq!(spool.send_state("t1", 1).await.unwrap(), None);
        assert_eq!(spool.commit(vec![accept("k1", "late")]).await.unwrap(), [Outcome::Duplicate]);
        let events: Vec<Vec<u8>> = spool.outbox(0, 10).await.unwrap().into_iter().map(|(_, e)| e).collect();
        assert_eq!(events, [b"received".to_vec(), b"received".to_vec()], "a duplicate appends nothing");

        let first = spool.outbox(0, 1).await.unwrap()[0].0;
        assert_eq!(spool.outbox(first, 10).await.unwrap().len(), 1, "reading after a stage skips it");
        spool.commit(vec![Op::Shipped { through: first }]).await.unwrap();
        assert_eq!(spool.depths().await.unwrap(), (1, 1));
        spool.commit(vec![Op::Finish { seq: 1, id: "t1".into(), chunks: 1 }]).await.unwrap();
        assert_eq!(spool.send_state("t1", 0).await.unwrap(), None);
        assert_eq!(spool.answer("t1").await.unwrap(), None);
        spool.commit(vec![Op::PruneSeen { before_ms: 2000 }]).await.unwrap();
        assert!(matches!(spool.commit(vec![accept("k1", "after prune")]).await.unwrap()[0], Outcome::Accepted { .. }));
    }

    /// The files as a crash would leave them: redb holds the last checkpoint only, the rest is
    /// in the log.
    fn crash_copy(from: &Path, to: &Path, with_log: bool) {
        std::fs::copy(from.join("spool.redb"), to.join("spool.redb")).unwrap();
        if with_log {
            std::fs::copy(from.join("spool.log"), to.join("spool.log")).unwrap();
        }
    }

    #[tokio::test]
    async fn a_crash_loses_nothing_committed_since_the_checkpoint() {
        let (dir, crashed, without_log) =
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        spool.commit(vec![accept("k1", "m1"), accept("k2", "m2")]).await.unwrap();
        spool.commit(vec![Op::Send { id: "t1".into(), chunk: 0, state: SendState::Intent }]).await.unwrap();
        spool.commit(vec![Op::Finish { seq: 2, id: "t2".into(), chunks: 0 }]).await.unwrap();
        // Well within CHECKPOINT_EVERY: nothing of this is in redb's durable state yet.
        crash_copy(dir.path(), crashed.path(), true);
        crash_copy(dir.path(), without_log.path(), false);

        let spool = Spool::open(&without_log.path().join("spool.redb")).unwrap();
        assert_eq!(spool.unfinished().await.unwrap(), [], "without the log the commits are gone");
        spool.close().await;

        let spool = Spool::open(&crashed.path().join("spool.redb")).unwrap();
        assert_eq!(spool.unfinished().await.unwrap(), [(1, b"m1".to_vec())]);
        assert_eq!(spool.send_state("t1", 0).await.unwrap(), Some(SendState::Intent));
        assert_eq!(spool.commit(vec![accept("k2", "again")]).await.unwrap(), [Outcome::Duplicate]);
        assert_eq!(spool.commit(vec![accept("k3", "m3")]).await.unwrap(), [Outcome::Accepted { seq: 2 }]);
        spool.close().await;
        // Redone once: a restart after the redo's checkpoint finds the same, plus what followed.
        let spool = Spool::open(&crashed.path().join("spool.redb")).unwrap();
        assert_eq!(spool.unfinished().await.unwrap(), [(1, b"m1".to_vec()), (2, b"m3".to_vec())]);
    }

    #[tokio::test]
    async fn deferred_operations_join_the_next_commit_or_are_committed_soon() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        spool.commit(vec![accept("k1", "m1"), accept("k2", "m2")]).await.unwrap();
        let added = spool.traces_added();
        added.notified().await; // the accepts' stages
        spool
            .defer(vec![Op::Finish { seq: 1, id: "t1".into(), chunks: 0 }, Op::Trace(vec![b"done".to_vec()])])
            .unwrap();
        // Alone, it is committed within DEFER_AT_MOST, and the shipper is woken.
        tokio::time::timeout(Duration::from_secs(5), added.notified()).await.expect("deferred stages committed");
        assert_eq!(spool.depths().await.unwrap(), (1, 3));
        // With company, it joins the next commit.
        spool.defer(vec![Op::Finish { seq: 2, id: "t2".into(), chunks: 0 }]).unwrap();
        spool.commit(vec![accept("k3", "m3")]).await.unwrap();
        assert_eq!(spool.depths().await.unwrap(), (1, 4));
        // An emptied outbox does not number new stages from 1 again: the shipper reads on after
        // the last stage it shipped.
        spool.commit(vec![Op::Shipped { through: 4 }]).await.unwrap();
        spool.commit(vec![Op::Trace(vec![b"later".to_vec()])]).await.unwrap();
        assert_eq!(spool.outbox(4, 10).await.unwrap(), [(5, b"later".to_vec())]);
        // What is deferred when the spool closes is committed before the file is released.
        spool.defer(vec![Op::Shipped { through: 5 }]).unwrap();
        spool.close().await;
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        assert_eq!(spool.depths().await.unwrap(), (1, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_are_grouped_and_all_answered() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let spool = spool.clone();
                tokio::spawn(async move { spool.commit(vec![accept(&format!("k{}", i % 100), "m")]).await.unwrap() })
            })
            .collect();
        let mut accepted = 0;
        for task in tasks {
            if matches!(task.await.unwrap()[0], Outcome::Accepted { .. }) {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 100, "each key accepted exactly once");
        assert_eq!(spool.unfinished().await.unwrap().len(), 100);
    }
}
