//! The node's durable local state: messages accepted but not finished, what was already sent
//! for them, and trace stages waiting to be shipped.
//!
//! Written by one thread ([`writer`]). Callers hand it operations and (but for deferred ones,
//! below) wait for the commit; operations that arrive together share one commit and one flush
//! (group commit), which is what lets a webhook be durable before its 2xx without one disk flush
//! per message. Dedupe is checked and recorded in the same commit that accepts a message, so a
//! redelivery racing the original is still caught.
//!
//! A commit is made durable by its changes, appended to a write-ahead log ([`log`]) and flushed;
//! then they are applied to the [`overlay`], in memory. The tables in redb (the [`base`]) are
//! written only by a checkpoint ([`CHECKPOINT_EVERY`], or when the log fills): the overlay is
//! frozen, the log starts a new round, and what the frozen overlay holds goes to the base in one
//! durable transaction on a thread of its own, while commits go on into a new overlay above it
//! (a checkpoint's flush took as long as several commits', and every request waited for it). A
//! restart redoes the log's frames after the last checkpoint. Most of what a message writes
//! (itself, its answer, its chunks' states, its trace stages) is deleted again before the next
//! checkpoint and never reaches redb, whose commits cost more than the rest of the node's work
//! per message did.
//!
//! Only what must be on disk before something leaves the node waits for a commit: an accepted
//! message (before its 2xx) and the intent to send a chunk (before the send). What follows an
//! external effect (a message finished, trace stages shipped) is deferred: it joins the next
//! commit, or is applied on its own [`DEFER_AT_MOST`] later (to the overlay only: it reaches the
//! disk with the next checkpoint), so under load it costs no flush of its own. Losing it in a
//! crash repeats no send: the message is resumed, its chunk found with an intent only and
//! reported as of unknown outcome; shipped stages are shipped again and the control plane stores
//! each once.

mod base;
mod log;
mod overlay;
mod writer;

use base::Tables;
use bytes::Bytes;
use log::{Change, Log, Round};
use omni_core::metrics::Histogram;
use overlay::{Layers, Overlay};
use redb::{Database, ReadableDatabase};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock, mpsc};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{Notify, oneshot};
use writer::{Message, Request, Timings, Writer};

const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Commit times are mostly an fsync: finer buckets than request latencies.
const SPOOL_COMMIT_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5];

/// Deferred operations are committed at most this long after the first of them.
pub const DEFER_AT_MOST: Duration = Duration::from_millis(5);

/// A checkpoint starts at most this long after a change.
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

/// The way to the writer thread, shared by the spool's handles; the last one dropped tells the
/// writer to finish.
struct Requests(mpsc::Sender<Message>);

impl Requests {
    fn send(&self, request: Request) -> Result<(), SpoolError> {
        self.0.send(Message::Request(request)).map_err(|_| SpoolError::Stopped)
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        let _ = self.0.send(Message::Close);
    }
}

#[derive(Clone)]
pub struct Spool {
    db: Arc<Database>,
    layers: Arc<RwLock<Layers>>,
    requests: Arc<Requests>,
    /// Why the writer refuses every commit, once it does (see [`Spool::failed`]).
    failed: Arc<OnceLock<String>>,
    /// Messages numbered up to this one were accepted before this run: the ones to resume.
    resumable_through: u64,
    /// Woken after a commit that added trace stages.
    traces_added: Arc<Notify>,
    /// How long each commit took (flush included).
    pub commits: Arc<Histogram>,
    /// How long each checkpoint took, from its start to its commit (commits go on meanwhile).
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
        // The base's working set is small (what was unfinished or unshipped at a checkpoint,
        // and idempotency keys); redb's default cache would grow far beyond it.
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(path).map_err(storage)?;
        Spool::start(path, db)
    }

    /// Opens the spool on `db`, the base at `path`.
    fn start(path: &Path, db: Database) -> Result<Spool, SpoolError> {
        let db = Arc::new(db);
        let txn = db.begin_write().map_err(storage)?;
        // Redone and checkpointed in one transaction, which starts a new round of the log.
        let (mut log, overlay, round) = {
            let mut tables = Tables::open(&txn)?;
            let (log, frames) = Log::open(path, tables.round()?).map_err(storage)?;
            for frame in &frames {
                let changes = Change::decode_all(frame)
                    .ok_or_else(|| SpoolError::Storage("unreadable change in the spool log".into()))?;
                for change in changes {
                    tables.redo(&change)?;
                }
            }
            if !frames.is_empty() {
                tracing::info!(groups = frames.len(), "spool: redid what the log held after the last checkpoint");
            }
            let round = Round { group: log.group, file: 0, salt: log::new_salt() };
            tables.record_round(round)?;
            let (base_inbox_last, base_outbox_last) = tables.last_keys()?;
            let (messages, stages) = tables.lens()?;
            (log, Overlay { base_inbox_last, base_outbox_last, messages, stages, ..Overlay::default() }, round)
        };
        txn.commit().map_err(storage)?;
        log.restart(round);
        let resumable_through = overlay.base_inbox_last;
        let (next_inbox, next_outbox) = (overlay.base_inbox_last + 1, overlay.base_outbox_last + 1);
        let layers = Arc::new(RwLock::new(Layers { live: overlay, frozen: None }));
        let failed = Arc::new(OnceLock::new());
        // Unbounded: callers of `commit` wait for their reply, and deferred operations follow
        // committed ones (a finish follows an accept), so what waits is bounded by the work.
        let (messages, rx) = mpsc::channel();
        let traces_added = Arc::new(Notify::new());
        let timings = Timings {
            commits: Arc::new(Histogram::new(SPOOL_COMMIT_BUCKETS)),
            checkpoints: Arc::new(Histogram::new(SPOOL_COMMIT_BUCKETS)),
        };
        let writer = Writer {
            db: db.clone(),
            log,
            layers: layers.clone(),
            base: None,
            failed: failed.clone(),
            deferred_failures: 0,
            next_inbox,
            next_outbox,
            traces_added: traces_added.clone(),
            timings: timings.clone(),
            messages: messages.clone(),
            checkpoint: None,
            asked: Vec::new(),
        };
        let handle =
            std::thread::Builder::new().name("omni-spool".into()).spawn(move || writer.run(rx)).map_err(storage)?;
        Ok(Spool {
            db,
            layers,
            requests: Arc::new(Requests(messages)),
            failed,
            resumable_through,
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
        self.requests.send(Request { ops, reply: Some(reply), checkpoint: false })?;
        done.await.map_err(|_| SpoolError::Stopped)?
    }

    /// Notified after each commit that added trace stages to the outbox.
    pub fn traces_added(&self) -> Arc<Notify> {
        self.traces_added.clone()
    }

    /// Commits whatever is deferred, then writes everything to the base and starts the log over.
    pub async fn checkpoint(&self) -> Result<(), SpoolError> {
        let (reply, done) = oneshot::channel();
        let request = Request { ops: Vec::new(), reply: Some(reply), checkpoint: true };
        self.requests.send(request)?;
        done.await.map_err(|_| SpoolError::Stopped)?.map(drop)
    }

    /// Hands `ops` over to be committed with the next commit, or within [`DEFER_AT_MOST`]; for
    /// what may be lost in a crash without harm. Not readable before that.
    pub fn defer(&self, ops: Vec<Op>) -> Result<(), SpoolError> {
        self.requests.send(Request { ops, reply: None, checkpoint: false })
    }

    /// Why the spool accepts nothing any more, if it does not: a checkpoint whose commit failed
    /// may or may not have reached the disk, and what the log holds after it might not be redone
    /// at the next start. A restart reopens it and finds out.
    pub fn failed(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// The overlays, read. Only the writer thread changes them, briefly.
    fn layers(&self) -> std::sync::RwLockReadGuard<'_, Layers> {
        self.layers.read().expect("spool overlay poisoned")
    }

    /// Reads the base (redb) off the async threads.
    async fn read_base<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database, &RwLock<Layers>) -> Result<T, SpoolError> + Send + 'static,
    ) -> Result<T, SpoolError> {
        let (db, layers) = (self.db.clone(), self.layers.clone());
        tokio::task::spawn_blocking(move || f(&db, &layers)).await.map_err(storage)?
    }

    /// The messages accepted before this run and not finished, oldest first.
    pub async fn unfinished(&self) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let through = self.resumable_through;
        // They are in the base since the open, and only leave it (once resumed and finished).
        let finished: std::collections::HashSet<u64> = self.layers().deleted_messages().collect();
        self.read_base(move |db, _| {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(base::INBOX).map_err(storage)?;
            let mut out = Vec::new();
            for entry in table.range(..=through).map_err(storage)? {
                let (seq, message) = entry.map_err(storage)?;
                if !finished.contains(&seq.value()) {
                    out.push((seq.value(), message.value().to_vec()));
                }
            }
            Ok(out)
        })
        .await
    }

    pub async fn answer(&self, id: &str) -> Result<Option<String>, SpoolError> {
        if let Some(kept) = self.layers().find(|o| &o.answers, id) {
            return Ok(kept.cloned());
        }
        let id = id.to_owned();
        self.read_base(move |db, _| {
            let table = db.begin_read().map_err(storage)?.open_table(base::ANSWERS).map_err(storage)?;
            Ok(table.get(id.as_str()).map_err(storage)?.map(|v| v.value().to_owned()))
        })
        .await
    }

    pub async fn send_state(&self, id: &str, chunk: u32) -> Result<Option<SendState>, SpoolError> {
        let key = chunk_key(id, chunk);
        if let Some(state) = self.layers().find(|o| &o.sends, key.as_str()) {
            return Ok(state.and_then(|s| SendState::from_u8(*s)));
        }
        self.read_base(move |db, _| {
            let table = db.begin_read().map_err(storage)?.open_table(base::SENDS).map_err(storage)?;
            Ok(table.get(key.as_str()).map_err(storage)?.and_then(|v| SendState::from_u8(v.value())))
        })
        .await
    }

    /// Up to `limit` trace stages after stage `after`, oldest first.
    pub async fn outbox(&self, after: u64, limit: usize) -> Result<Vec<(u64, Bytes)>, SpoolError> {
        {
            let layers = self.layers();
            if !layers.below_has_stages_after(after) {
                return Ok(layers.live.stages_after(after, limit));
            }
        }
        // Stages a checkpoint found unshipped (or an earlier run left), then the frozen overlay's,
        // then the live one's, each numbered above the one before. The base's snapshot is taken
        // with the overlays', so that no checkpoint can move stages from the one to the other
        // unseen: the snapshot may already hold the frozen overlay's stages (its checkpoint
        // committed, the overlay not yet dropped), which are taken once.
        self.read_base(move |db, layers| {
            let (txn, shipped_through, frozen, live) = {
                let layers = layers.read().expect("spool overlay poisoned");
                let txn = db.begin_read().map_err(storage)?;
                let live = layers.live.stages_after(after, limit);
                (txn, layers.base_shipped_through(), layers.frozen_stages_after(after, limit), live)
            };
            let table = txn.open_table(base::OUTBOX).map_err(storage)?;
            let mut out = Vec::with_capacity(limit);
            for entry in table.range(after.max(shipped_through).saturating_add(1)..).map_err(storage)?.take(limit) {
                let (seq, event) = entry.map_err(storage)?;
                out.push((seq.value(), Bytes::copy_from_slice(event.value())));
            }
            for (seq, event) in frozen.into_iter().chain(live) {
                if out.len() == limit {
                    break;
                }
                if out.last().is_none_or(|(last, _)| seq > *last) {
                    out.push((seq, event));
                }
            }
            Ok(out)
        })
        .await
    }

    /// (unfinished messages, trace stages waiting), for metrics.
    pub async fn depths(&self) -> Result<(u64, u64), SpoolError> {
        let layers = self.layers();
        Ok((layers.live.messages, layers.live.stages))
    }
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
        let events: Vec<Vec<u8>> = spool.outbox(0, 10).await.unwrap().into_iter().map(|(_, e)| e.to_vec()).collect();
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
            copy_log(from, to);
        }
    }

    fn copy_log(from: &Path, to: &Path) {
        for file in ["spool.log", "spool.log.1"] {
            std::fs::copy(from.join(file), to.join(file)).unwrap();
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

    /// A spool written before the log had two files names none in its base (no `log_file`):
    /// what its one log, `spool.log`, holds is redone.
    #[tokio::test]
    async fn a_spool_from_before_the_second_log_file_is_redone_from_its_log() {
        let (dir, earlier) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        spool.commit(vec![accept("k1", "m1")]).await.unwrap();
        std::fs::copy(dir.path().join("spool.redb"), earlier.path().join("spool.redb")).unwrap();
        std::fs::copy(dir.path().join("spool.log"), earlier.path().join("spool.log")).unwrap();
        {
            let db = redb::Database::open(earlier.path().join("spool.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            assert!(txn.open_table(base::META).unwrap().remove("log_file").unwrap().is_some());
            txn.commit().unwrap();
        }
        let spool = Spool::open(&earlier.path().join("spool.redb")).unwrap();
        assert_eq!(spool.unfinished().await.unwrap(), [(1, b"m1".to_vec())]);
        assert_eq!(spool.commit(vec![accept("k1", "again")]).await.unwrap(), [Outcome::Duplicate]);
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
        assert_eq!(spool.outbox(4, 10).await.unwrap(), [(5, Bytes::from_static(b"later"))]);
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
        assert_eq!(spool.depths().await.unwrap(), (100, 100));
        // Being handled already, they are not for this run to resume; the next run's.
        assert_eq!(spool.unfinished().await.unwrap(), []);
        spool.close().await;
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        assert_eq!(spool.unfinished().await.unwrap().len(), 100);
    }

    /// What a checkpoint moved to the base reads, counts and is deleted as when it was in the
    /// overlay; and a crash after more commits finds both.
    #[tokio::test]
    async fn state_spanning_checkpoints_reads_and_counts_the_same() {
        let (dir, crashed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        assert_eq!(spool.commit(vec![accept("k1", "m1")]).await.unwrap(), [Outcome::Accepted { seq: 1 }]);
        spool.commit(vec![Op::Answer { id: "t1".into(), text: "hi".into() }]).await.unwrap();
        spool.commit(vec![Op::Send { id: "t1".into(), chunk: 0, state: SendState::Intent }]).await.unwrap();
        spool.checkpoint().await.unwrap();
        // In the base now: the message, its answer and chunk, its unshipped stage, its key.
        assert_eq!(spool.depths().await.unwrap(), (1, 1));
        assert_eq!(spool.answer("t1").await.unwrap().as_deref(), Some("hi"));
        assert_eq!(spool.send_state("t1", 0).await.unwrap(), Some(SendState::Intent));
        assert_eq!(spool.commit(vec![accept("k1", "again")]).await.unwrap(), [Outcome::Duplicate]);
        // Stages of the base come before the overlay's, and reading after one skips it.
        spool.commit(vec![Op::Trace(vec![b"second".to_vec()])]).await.unwrap();
        let stages = spool.outbox(0, 10).await.unwrap();
        assert_eq!(stages, [(1, Bytes::from_static(b"received")), (2, Bytes::from_static(b"second"))]);
        assert_eq!(spool.outbox(1, 10).await.unwrap(), [(2, Bytes::from_static(b"second"))]);
        assert_eq!(spool.outbox(0, 1).await.unwrap().len(), 1, "the limit holds across both");
        spool.commit(vec![Op::Shipped { through: 1 }]).await.unwrap();
        assert_eq!(spool.depths().await.unwrap(), (1, 1));
        assert_eq!(spool.outbox(0, 10).await.unwrap(), [(2, Bytes::from_static(b"second"))]);
        // Finished after the checkpoint: gone from every read, counted once.
        spool.commit(vec![Op::Send { id: "t1".into(), chunk: 0, state: SendState::Sent }]).await.unwrap();
        spool.commit(vec![Op::Finish { seq: 1, id: "t1".into(), chunks: 1 }]).await.unwrap();
        spool.commit(vec![Op::Finish { seq: 1, id: "t1".into(), chunks: 1 }]).await.unwrap();
        assert_eq!(spool.depths().await.unwrap(), (0, 1));
        assert_eq!(spool.answer("t1").await.unwrap(), None);
        assert_eq!(spool.send_state("t1", 0).await.unwrap(), None);
        assert_eq!(spool.commit(vec![accept("k2", "m2")]).await.unwrap(), [Outcome::Accepted { seq: 2 }]);
        // A crash now: the base has the checkpoint, the log the rest.
        crash_copy(dir.path(), crashed.path(), true);
        spool.checkpoint().await.unwrap();
        assert_eq!(spool.depths().await.unwrap(), (1, 2));
        spool.close().await;
        for path in [dir.path(), crashed.path()] {
            let spool = Spool::open(&path.join("spool.redb")).unwrap();
            assert_eq!(spool.unfinished().await.unwrap(), [(2, b"m2".to_vec())]);
            assert_eq!(spool.depths().await.unwrap(), (1, 2));
            let stages: Vec<u64> = spool.outbox(0, 10).await.unwrap().into_iter().map(|(seq, _)| seq).collect();
            assert_eq!(stages, [2, 3]);
            assert_eq!(spool.answer("t1").await.unwrap(), None);
            assert_eq!(spool.commit(vec![accept("k1", "late")]).await.unwrap(), [Outcome::Duplicate]);
            // Pruned keys are forgotten in the base too.
            spool.commit(vec![Op::PruneSeen { before_ms: 2000 }]).await.unwrap();
            assert!(matches!(
                spool.commit(vec![accept("k1", "after prune")]).await.unwrap()[0],
                Outcome::Accepted { .. }
            ));
            spool.close().await;
        }
    }

    /// Holds whoever passes it while closed, and tells when someone waits there.
    #[derive(Debug, Default)]
    struct Gate {
        /// (closed, someone held)
        state: std::sync::Mutex<(bool, bool)>,
        changed: std::sync::Condvar,
    }

    impl Gate {
        fn close(&self) {
            self.state.lock().unwrap().0 = true;
        }

        fn open(&self) {
            self.state.lock().unwrap().0 = false;
            self.changed.notify_all();
        }

        fn pass(&self) {
            let mut state = self.state.lock().unwrap();
            while state.0 {
                state.1 = true;
                self.changed.notify_all();
                state = self.changed.wait(state).unwrap();
            }
            state.1 = false;
        }

        fn wait_until_held(&self, within: Duration) -> bool {
            let state = self.state.lock().unwrap();
            self.changed.wait_timeout_while(state, within, |state| !state.1).unwrap().0.1
        }
    }

    fn stage_numbers(stages: Vec<(u64, Bytes)>) -> Vec<u64> {
        stages.into_iter().map(|(seq, _)| seq).collect()
    }

    /// A checkpoint writes while commits go on: they dedupe, read and delete across the overlay
    /// it writes. A crash meanwhile, before its commit reached the file or after, loses nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_go_on_while_a_checkpoint_writes_and_a_crash_meanwhile_loses_nothing() {
        let (dir, before_commit, after_commit) =
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let path = dir.path().join("spool.redb");
        let gate = Arc::new(Gate::default());
        let held = gate.clone();
        // A checkpoint's commit held half done, at its flush.
        let spool = spool_with_hooked_syncs(&path, move || {
            held.pass();
            Ok(())
        });
        // Keys are pruned before they are taken, as after the clock stepped back: they are kept.
        spool.commit(vec![Op::PruneSeen { before_ms: 2000 }]).await.unwrap();
        spool.commit(vec![accept("k1", "m1"), accept("k2", "m2")]).await.unwrap();
        spool.commit(vec![Op::Answer { id: "t1".into(), text: "hi".into() }]).await.unwrap();
        spool.commit(vec![Op::Send { id: "t1".into(), chunk: 0, state: SendState::Intent }]).await.unwrap();
        // The base as a crash finds it while the checkpoint below has not committed.
        std::fs::copy(&path, before_commit.path().join("spool.redb")).unwrap();

        gate.close();
        let checkpoint = tokio::spawn({
            let spool = spool.clone();
            async move { spool.checkpoint().await }
        });
        let held = tokio::task::spawn_blocking({
            let gate = gate.clone();
            move || gate.wait_until_held(Duration::from_secs(10))
        });
        assert!(held.await.unwrap(), "the checkpoint reached its commit's flush");

        let within = Duration::from_secs(10);
        let outcomes = tokio::time::timeout(within, spool.commit(vec![accept("k1", "again"), accept("k3", "m3")]))
            .await
            .expect("a commit does not wait for the checkpoint")
            .unwrap();
        assert_eq!(outcomes, [Outcome::Duplicate, Outcome::Accepted { seq: 3 }]);
        assert_eq!(spool.answer("t1").await.unwrap().as_deref(), Some("hi"));
        assert_eq!(spool.send_state("t1", 0).await.unwrap(), Some(SendState::Intent));
        spool.commit(vec![Op::Send { id: "t1".into(), chunk: 0, state: SendState::Sent }]).await.unwrap();
        spool.commit(vec![Op::Finish { seq: 1, id: "t1".into(), chunks: 1 }]).await.unwrap();
        assert_eq!(spool.answer("t1").await.unwrap(), None);
        assert_eq!(spool.send_state("t1", 0).await.unwrap(), None);
        assert_eq!(stage_numbers(spool.outbox(0, 10).await.unwrap()), [1, 2, 3]);
        spool.commit(vec![Op::Shipped { through: 1 }]).await.unwrap();
        assert_eq!(stage_numbers(spool.outbox(0, 10).await.unwrap()), [2, 3]);
        assert_eq!(stage_numbers(spool.outbox(0, 1).await.unwrap()), [2], "the limit holds across the layers");
        assert_eq!(spool.depths().await.unwrap(), (2, 2));
        assert!(!checkpoint.is_finished(), "the checkpoint is still held");
        copy_log(dir.path(), before_commit.path());
        // The base with the checkpoint's commit written, not yet flushed.
        crash_copy(dir.path(), after_commit.path(), true);

        gate.open();
        tokio::time::timeout(within, checkpoint).await.expect("the checkpoint ends").unwrap().unwrap();
        // The same after the frozen overlay was dropped for the base.
        assert_eq!(spool.depths().await.unwrap(), (2, 2));
        assert_eq!(spool.answer("t1").await.unwrap(), None);
        assert_eq!(stage_numbers(spool.outbox(0, 10).await.unwrap()), [2, 3]);
        assert_eq!(spool.commit(vec![accept("k2", "again")]).await.unwrap(), [Outcome::Duplicate]);
        assert_eq!(spool.commit(vec![accept("k4", "m4")]).await.unwrap(), [Outcome::Accepted { seq: 4 }]);
        spool.close().await;

        for crashed in [before_commit.path(), after_commit.path()] {
            let spool = Spool::open(&crashed.join("spool.redb")).unwrap();
            assert_eq!(spool.unfinished().await.unwrap(), [(2, b"m2".to_vec()), (3, b"m3".to_vec())], "{crashed:?}");
            assert_eq!(spool.answer("t1").await.unwrap(), None);
            assert_eq!(spool.send_state("t1", 0).await.unwrap(), None);
            assert_eq!(stage_numbers(spool.outbox(0, 10).await.unwrap()), [2, 3]);
            assert_eq!(spool.depths().await.unwrap(), (2, 2));
            assert_eq!(spool.commit(vec![accept("k3", "again")]).await.unwrap(), [Outcome::Duplicate]);
            spool.close().await;
        }
        let spool = Spool::open(&path).unwrap();
        let unfinished: Vec<u64> = spool.unfinished().await.unwrap().into_iter().map(|(seq, _)| seq).collect();
        assert_eq!(unfinished, [2, 3, 4]);
    }

    /// redb's file, with a hook run before each sync: to fail it, hold it or panic in it.
    struct HookedSyncs {
        file: redb::backends::FileBackend,
        before_sync: Box<dyn Fn() -> std::io::Result<()> + Send + Sync>,
    }

    impl std::fmt::Debug for HookedSyncs {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("HookedSyncs").finish_non_exhaustive()
        }
    }

    impl redb::StorageBackend for HookedSyncs {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.file.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            (self.before_sync)()?;
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.file.write(offset, data)
        }
        fn close(&self) -> Result<(), std::io::Error> {
            self.file.close()
        }
    }

    /// A spool on redb's file with `before_sync` run before each of its syncs.
    fn spool_with_hooked_syncs(
        path: &Path,
        before_sync: impl Fn() -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Spool {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap();
        let backend =
            HookedSyncs { file: redb::backends::FileBackend::new(file).unwrap(), before_sync: Box::new(before_sync) };
        Spool::start(path, redb::Builder::new().create_with_backend(backend).unwrap()).unwrap()
    }

    /// A spool whose syncs fail while the flag returned is set, by an error or (with `panic`) a panic.
    fn spool_with_failing_syncs(path: &Path, panic: bool) -> (Spool, Arc<std::sync::atomic::AtomicBool>) {
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let failing = fail.clone();
        let spool = spool_with_hooked_syncs(path, move || {
            if !failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(());
            }
            assert!(!panic, "injected sync panic");
            Err(std::io::Error::other("injected sync failure"))
        });
        (spool, fail)
    }

    /// A checkpoint's thread that panics stops the spool as a failed commit does: whoever waits
    /// is answered, closing returns, and a restart finds everything.
    #[tokio::test]
    async fn a_checkpoint_that_panics_stops_the_spool_and_closing_still_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        let (spool, fail) = spool_with_failing_syncs(&path, true);
        spool.commit(vec![accept("k1", "m1")]).await.unwrap();
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let within = Duration::from_secs(10);
        let checkpointed = tokio::time::timeout(within, spool.checkpoint()).await.expect("answered");
        assert!(checkpointed.is_err());
        assert!(spool.failed().is_some_and(|why| why.contains("panicked")), "{:?}", spool.failed());
        assert!(matches!(spool.commit(vec![accept("k2", "m2")]).await, Err(SpoolError::Storage(_))));
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::timeout(within, spool.close()).await.expect("closing returns");

        let spool = Spool::open(&path).unwrap();
        assert_eq!(spool.unfinished().await.unwrap(), [(1, b"m1".to_vec())]);
    }

    #[tokio::test]
    async fn a_checkpoint_that_fails_to_commit_stops_the_spool_until_it_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        let (spool, fail) = spool_with_failing_syncs(&path, false);
        spool.commit(vec![accept("k1", "m1")]).await.unwrap();
        assert!(spool.failed().is_none());

        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(spool.checkpoint().await.is_err());
        // Whether the checkpoint reached the disk is unknown: nothing more is taken.
        assert!(spool.failed().is_some_and(|why| why.contains("restarted")), "{:?}", spool.failed());
        assert!(matches!(spool.commit(vec![accept("k2", "m2")]).await, Err(SpoolError::Storage(_))));
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(spool.commit(vec![accept("k2", "m2")]).await.is_err(), "still stopped once the disk recovers");
        spool.close().await;

        // Reopened, it holds what it accepted before, and takes messages again.
        let spool = Spool::open(&path).unwrap();
        assert_eq!(spool.unfinished().await.unwrap(), [(1, b"m1".to_vec())]);
        assert_eq!(spool.commit(vec![accept("k2", "m2")]).await.unwrap(), [Outcome::Accepted { seq: 2 }]);
    }
}
