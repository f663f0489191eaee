//! The node's durable local state: messages accepted but not finished, what was already sent
//! for them, and trace stages waiting to be shipped.
//!
//! One redb database, written by one thread. Callers hand it operations and wait for the
//! commit; operations that arrive together share one transaction and one fsync (group
//! commit), which is what lets a webhook be durable before its 2xx without one disk flush per
//! message. Dedupe is checked and recorded in the same transaction that accepts a message, so a
//! redelivery racing the original is still caught.

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

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

const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Operations committed per transaction at most; more wait for the next one.
const MAX_GROUP: usize = 1024;

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
    /// Trace stages shipped.
    Shipped(Vec<u64>),
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
    reply: oneshot::Sender<Result<Vec<Outcome>, SpoolError>>,
}

#[derive(Clone)]
pub struct Spool {
    db: Arc<Database>,
    requests: mpsc::Sender<Request>,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

fn chunk_key(id: &str, chunk: u32) -> String {
    format!("{id}/{chunk}")
}

impl Spool {
    /// Opens (creating) the spool file and starts its writer thread.
    pub fn open(path: &Path) -> Result<Spool, SpoolError> {
        // The spool's working set is small (unfinished messages and unshipped stages); redb's
        // default cache would grow far beyond it.
        let db = Arc::new(redb::Builder::new().set_cache_size(CACHE_BYTES).create(path).map_err(storage)?);
        let txn = db.begin_write().map_err(storage)?;
        {
            txn.open_table(INBOX).map_err(storage)?;
            txn.open_table(SEEN).map_err(storage)?;
            txn.open_table(ANSWERS).map_err(storage)?;
            txn.open_table(SENDS).map_err(storage)?;
            txn.open_table(OUTBOX).map_err(storage)?;
            txn.open_table(ATTEMPTS).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        let (requests, rx) = mpsc::channel(4096);
        let writer_db = db.clone();
        let handle = std::thread::Builder::new()
            .name("omni-spool".into())
            .spawn(move || writer(writer_db, rx))
            .map_err(storage)?;
        Ok(Spool { db, requests, writer: Arc::new(std::sync::Mutex::new(Some(handle))) })
    }

    /// Stops the writer once every other handle is gone, and waits for it to release the file.
    pub async fn close(self) {
        let Spool { db, requests, writer } = self;
        drop(requests);
        drop(db);
        let handle = writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }

    /// Commits `ops` (with whatever else is pending) and returns one outcome per op.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, SpoolError> {
        let (reply, done) = oneshot::channel();
        self.requests.send(Request { ops, reply }).await.map_err(|_| SpoolError::Stopped)?;
        done.await.map_err(|_| SpoolError::Stopped)?
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

    /// Up to `limit` trace stages to ship, oldest first.
    pub async fn outbox(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(OUTBOX).map_err(storage)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(storage)?.take(limit) {
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

/// The writer thread: takes whatever requests are waiting, applies them in one transaction,
/// commits durably, then answers them all.
fn writer(db: Arc<Database>, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        let mut ops = group[0].ops.len();
        while ops < MAX_GROUP {
            match rx.try_recv() {
                Ok(next) => {
                    ops += next.ops.len();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        match apply(&db, &mut group) {
            Ok(outcomes) => {
                for (request, outcome) in group.into_iter().zip(outcomes) {
                    let _ = request.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "spool commit failed");
                for request in group {
                    let _ = request.reply.send(Err(SpoolError::Storage(e.to_string())));
                }
            }
        }
    }
}

fn apply(db: &Database, group: &mut [Request]) -> Result<Vec<Vec<Outcome>>, SpoolError> {
    let txn = db.begin_write().map_err(storage)?;
    let mut all = Vec::with_capacity(group.len());
    {
        let mut inbox = txn.open_table(INBOX).map_err(storage)?;
        let mut seen = txn.open_table(SEEN).map_err(storage)?;
        let mut answers = txn.open_table(ANSWERS).map_err(storage)?;
        let mut sends = txn.open_table(SENDS).map_err(storage)?;
        let mut outbox = txn.open_table(OUTBOX).map_err(storage)?;
        let mut attempts = txn.open_table(ATTEMPTS).map_err(storage)?;
        let mut next_inbox = next_key(&inbox)?;
        let mut next_outbox = next_key(&outbox)?;
        let mut append = |outbox: &mut redb::Table<u64, &[u8]>, events: &[Vec<u8>]| -> Result<(), SpoolError> {
            for event in events {
                outbox.insert(next_outbox, event.as_slice()).map_err(storage)?;
                next_outbox += 1;
            }
            Ok(())
        };
        for request in group.iter_mut() {
            let mut outcomes = Vec::with_capacity(request.ops.len());
            for op in request.ops.drain(..) {
                let outcome = match op {
                    Op::Accept { dedupe_key, now_ms, message, trace } => {
                        if seen.get(dedupe_key.as_str()).map_err(storage)?.is_some() {
                            Outcome::Duplicate
                        } else {
                            seen.insert(dedupe_key.as_str(), now_ms).map_err(storage)?;
                            let seq = next_inbox;
                            next_inbox += 1;
                            inbox.insert(seq, message.as_slice()).map_err(storage)?;
                            append(&mut outbox, &trace)?;
                            Outcome::Accepted { seq }
                        }
                    }
                    Op::Trace(events) => {
                        append(&mut outbox, &events)?;
                        Outcome::Done
                    }
                    Op::Answer { id, text } => {
                        answers.insert(id.as_str(), text.as_str()).map_err(storage)?;
                        Outcome::Done
                    }
                    Op::Send { id, chunk, state } => {
                        sends.insert(chunk_key(&id, chunk).as_str(), state as u8).map_err(storage)?;
                        Outcome::Done
                    }
                    Op::Resume { seq } => {
                        let n = attempts.get(seq).map_err(storage)?.map_or(0, |v| v.value()) + 1;
                        attempts.insert(seq, n).map_err(storage)?;
                        Outcome::Attempt(n)
                    }
                    Op::Finish { seq, id, chunks } => {
                        inbox.remove(seq).map_err(storage)?;
                        attempts.remove(seq).map_err(storage)?;
                        answers.remove(id.as_str()).map_err(storage)?;
                        for chunk in 0..chunks {
                            sends.remove(chunk_key(&id, chunk).as_str()).map_err(storage)?;
                        }
                        Outcome::Done
                    }
                    Op::Shipped(seqs) => {
                        for seq in seqs {
                            outbox.remove(seq).map_err(storage)?;
                        }
                        Outcome::Done
                    }
                    Op::PruneSeen { before_ms } => {
                        seen.retain(|_, at| at >= before_ms).map_err(storage)?;
                        Outcome::Done
                    }
                };
                outcomes.push(outcome);
            }
            all.push(outcomes);
        }
    }
    txn.commit().map_err(storage)?;
    Ok(all)
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
        let unfinished = spool.unfinished().await.unwrap();
        assert_eq!(unfinished, vec![(1, b"m1".to_vec())]);
        assert_eq!(spool.answer("t1").await.unwrap().as_deref(), Some("hi"));
        assert_eq!(spool.send_state("t1", 0).await.unwrap(), Some(SendState::Intent));
        assert_eq!(spool.send_state("t1", 1).await.unwrap(), None);
        assert_eq!(spool.commit(vec![accept("k1", "late")]).await.unwrap(), [Outcome::Duplicate]);
        let events: Vec<Vec<u8>> = spool.outbox(10).await.unwrap().into_iter().map(|(_, e)| e).collect();
        assert_eq!(events, [b"received".to_vec(), b"received".to_vec()], "a duplicate appends nothing");

        let seqs: Vec<u64> = spool.outbox(1).await.unwrap().into_iter().map(|(s, _)| s).collect();
        spool.commit(vec![Op::Shipped(seqs)]).await.unwrap();
        assert_eq!(spool.depths().await.unwrap(), (1, 1));
        spool.commit(vec![Op::Finish { seq: 1, id: "t1".into(), chunks: 1 }]).await.unwrap();
        assert_eq!(spool.send_state("t1", 0).await.unwrap(), None);
        assert_eq!(spool.answer("t1").await.unwrap(), None);
        spool.commit(vec![Op::PruneSeen { before_ms: 2000 }]).await.unwrap();
        assert!(matches!(spool.commit(vec![accept("k1", "after prune")]).await.unwrap()[0], Outcome::Accepted { .. }));
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
