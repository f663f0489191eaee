//! The writer thread, the spool's only writer. For each group of requests that arrived together
//! it plans their operations against the overlays and the base (dedupe, numbering), makes the
//! planned changes durable in one log frame, applies them to the live overlay and answers. From
//! time to time it starts a checkpoint: the live overlay is frozen, the log goes on in a new
//! round, and a thread of the checkpoint's own writes the frozen overlay to the base in one
//! durable transaction while commits go on. It reports back here, and the frozen overlay is
//! dropped. Only one checkpoint runs at a time.

use super::base::{Base, Tables};
use super::log::{self, Change, Frame, Log, Round};
use super::overlay::{Layers, Overlay};
use super::{CHECKPOINT_EVERY, DEFER_AT_MOST, Op, Outcome, SpoolError, chunk_key, storage};
use omni_core::metrics::Histogram;
use redb::{Database, ReadableDatabase};
use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock, RwLock, mpsc};
use std::time::Instant;
use tokio::sync::{Notify, oneshot};

/// Operations committed per group at most; more wait for the next one.
const MAX_GROUP: usize = 1024;

pub type Reply = oneshot::Sender<Result<Vec<Outcome>, SpoolError>>;

pub struct Request {
    pub ops: Vec<Op>,
    /// `None` for deferred operations: nobody waits for them.
    pub reply: Option<Reply>,
    /// Answered only once a checkpoint started after the commit wrote everything to the base.
    pub checkpoint: bool,
}

/// What reaches the writer thread.
pub enum Message {
    Request(Request),
    /// A checkpoint's outcome: the base's last message and stage numbers once it committed.
    Checkpointed(Result<(u64, u64), SpoolError>),
    /// Every handle of the spool is gone: the writer finishes and stops.
    Close,
}

/// What the writer times.
#[derive(Clone)]
pub struct Timings {
    pub commits: Arc<Histogram>,
    pub checkpoints: Arc<Histogram>,
}

pub struct Writer {
    pub db: Arc<Database>,
    pub log: Log,
    /// Only this thread changes them; others read them.
    pub layers: Arc<RwLock<Layers>>,
    /// A snapshot of the base, below the overlays (taken again after each checkpoint).
    pub base: Option<Base>,
    /// Set when a checkpoint's commit failed: every later commit is refused.
    pub failed: Arc<OnceLock<String>>,
    /// Commits in a row whose deferred operations could not be planned.
    pub deferred_failures: u32,
    /// The next message and stage numbers; never reused within a run, so that the shipper can
    /// read on after the last stage it shipped.
    pub next_inbox: u64,
    pub next_outbox: u64,
    pub traces_added: Arc<Notify>,
    pub timings: Timings,
    /// For checkpoints to report back on.
    pub messages: mpsc::Sender<Message>,
    /// The checkpoint of the frozen overlay, from its start until it committed.
    pub checkpoint: Option<Checkpoint>,
    /// Callers waiting for a checkpoint that starts after their request.
    pub asked: Vec<Reply>,
}

/// A checkpoint: the frozen overlay, to be written to the base with the log's round after it.
pub struct Checkpoint {
    layer: Arc<Overlay>,
    round: Round,
    /// Callers waiting for it.
    asked: Vec<Reply>,
    started: Instant,
    /// Being written now; else its last try failed, and it is tried again later.
    running: bool,
}

/// When the writer must act without being asked: deferred operations due, a checkpoint due.
#[derive(Default)]
struct Due {
    deferred_since: Option<Instant>,
    /// The first change not yet frozen for a checkpoint.
    unchecked_since: Option<Instant>,
    /// After a checkpoint failed (or could not start): when it is tried again.
    retry_at: Option<Instant>,
}

impl Due {
    /// `checkpoint`: whether one was started and has not committed; none other starts meanwhile.
    fn next(&self, checkpoint: Option<&Checkpoint>) -> Option<Instant> {
        let deferred = self.deferred_since.map(|t| t + DEFER_AT_MOST);
        let checkpoint = match checkpoint {
            None => self.unchecked_since.map(|t| (t + CHECKPOINT_EVERY).max(self.retry_at.unwrap_or(t))),
            Some(c) if !c.running => self.retry_at,
            Some(_) => None,
        };
        deferred.into_iter().chain(checkpoint).min()
    }

    fn retry_allowed(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }
}

/// What planning found for an operation: applying it needs nothing else, and cannot fail.
enum Planned {
    Accepted {
        seq: u64,
        first_stage: u64,
    },
    Duplicate,
    Stages {
        first: u64,
    },
    Attempt(u32),
    /// For a message accepted before the last checkpoint started, which of its keys are below the
    /// live overlay.
    Finish(Option<FinishInBase>),
    /// How many of the shipped stages the base holds.
    Shipped {
        base_stages: u64,
    },
    Done,
}

struct FinishInBase {
    message: bool,
    attempts: bool,
    answer: bool,
    sends: Vec<bool>,
}

impl Planned {
    fn outcome(&self) -> Outcome {
        match *self {
            Planned::Accepted { seq, .. } => Outcome::Accepted { seq },
            Planned::Duplicate => Outcome::Duplicate,
            Planned::Attempt(n) => Outcome::Attempt(n),
            _ => Outcome::Done,
        }
    }
}

/// A group's plan: one [`Planned`] per operation (deferred ones first), the numbers after it,
/// and the frame that makes it durable (`None` when nobody waits for it).
struct Plan {
    planned: Vec<Planned>,
    next_inbox: u64,
    next_outbox: u64,
    frame: Option<Frame>,
}

/// Plans one group. The overlays and the base are read, never written.
fn plan(
    layers: &Layers,
    base: &Base,
    (next_inbox, next_outbox): (u64, u64),
    deferred: &[Op],
    group: &[Request],
) -> Result<Plan, SpoolError> {
    let mut planner = Planner {
        layers,
        base,
        next_inbox,
        next_outbox,
        shipped_through: layers.live.shipped_through,
        seen: HashSet::new(),
        attempts: HashMap::new(),
        frame: (!group.is_empty()).then(Frame::default),
    };
    let ops = deferred.iter().chain(group.iter().flat_map(|r| &r.ops));
    let planned = ops.map(|op| planner.plan(op)).collect::<Result<Vec<_>, _>>()?;
    Ok(Plan { planned, next_inbox: planner.next_inbox, next_outbox: planner.next_outbox, frame: planner.frame })
}

struct Planner<'a> {
    layers: &'a Layers,
    base: &'a Base,
    next_inbox: u64,
    next_outbox: u64,
    shipped_through: u64,
    /// Keys accepted and attempts counted earlier in the group.
    seen: HashSet<&'a str>,
    attempts: HashMap<u64, u32>,
    frame: Option<Frame>,
}

impl<'a> Planner<'a> {
    fn record(&mut self, change: Change<'_>) {
        if let Some(frame) = &mut self.frame {
            frame.push(&change);
        }
    }

    /// Numbers the stages; returns the first number.
    fn stages(&mut self, events: &[Vec<u8>]) -> u64 {
        let first = self.next_outbox;
        for event in events {
            self.record(Change::OutboxPut(self.next_outbox, event));
            self.next_outbox += 1;
        }
        first
    }

    fn seen(&self, key: &str) -> Result<bool, SpoolError> {
        if self.seen.contains(key) || self.layers.live.seen.contains_key(key) {
            return Ok(true);
        }
        // Below the live overlay, a key may be older than a prune not applied to it yet: the
        // live overlay's, for the frozen one's keys (its own prunes came before them); either
        // overlay's, for the base's.
        let older = |at: i64, before: Option<i64>| before.is_some_and(|before| at < before);
        if let Some(at) = self.layers.frozen.as_ref().and_then(|frozen| frozen.seen.get(key)) {
            return Ok(!older(*at, self.layers.live.prune_seen_before));
        }
        Ok(self.base.seen(key)?.is_some_and(|at| !older(at, self.layers.prune_seen_before())))
    }

    /// Whether the layers below the live overlay hold `key` in one table: the frozen overlay,
    /// if it tells, else the base.
    fn below<K, Q, V>(
        &self,
        table: impl Fn(&Overlay) -> &HashMap<K, Option<V>>,
        key: &Q,
        in_base: impl FnOnce(&Base) -> Result<bool, SpoolError>,
    ) -> Result<bool, SpoolError>
    where
        K: Borrow<Q> + Hash + Eq,
        Q: Hash + Eq + ?Sized,
    {
        match self.layers.frozen.as_deref().and_then(|frozen| table(frozen).get(key)) {
            Some(value) => Ok(value.is_some()),
            None => in_base(self.base),
        }
    }

    /// How many stages not yet shipped the layers below the live overlay hold in
    /// `after+1 ..= through`.
    fn stages_below(&self, after: u64, through: u64) -> Result<u64, SpoolError> {
        let Some(frozen) = self.layers.frozen.as_deref() else {
            return self.base.stages_in(after, through);
        };
        let frozen_stages = if through > after { frozen.outbox.range(after + 1..=through).count() as u64 } else { 0 };
        let base_after = after.max(frozen.shipped_through);
        Ok(frozen_stages + self.base.stages_in(base_after, through.min(frozen.base_outbox_last))?)
    }

    fn plan(&mut self, op: &'a Op) -> Result<Planned, SpoolError> {
        Ok(match op {
            Op::Accept { dedupe_key, now_ms, message, trace } => {
                if self.seen(dedupe_key)? {
                    return Ok(Planned::Duplicate);
                }
                self.seen.insert(dedupe_key);
                let seq = self.next_inbox;
                self.next_inbox += 1;
                self.record(Change::SeenPut(dedupe_key, *now_ms));
                self.record(Change::InboxPut(seq, message));
                Planned::Accepted { seq, first_stage: self.stages(trace) }
            }
            Op::Trace(events) => Planned::Stages { first: self.stages(events) },
            Op::Answer { id, text } => {
                self.record(Change::AnswerPut(id, text));
                Planned::Done
            }
            Op::Send { id, chunk, state } => {
                self.record(Change::SendPut(&chunk_key(id, *chunk), *state as u8));
                Planned::Done
            }
            Op::Resume { seq } => {
                let before = match (self.attempts.get(seq), self.layers.find(|o| &o.attempts, seq)) {
                    (Some(n), _) => *n,
                    (None, Some(n)) => n.copied().unwrap_or(0),
                    (None, None) => self.base.attempts(*seq)?.unwrap_or(0),
                };
                self.attempts.insert(*seq, before + 1);
                self.record(Change::AttemptPut(*seq, before + 1));
                Planned::Attempt(before + 1)
            }
            Op::Finish { seq, id, chunks } => {
                self.record(Change::InboxDelete(*seq));
                self.record(Change::AttemptDelete(*seq));
                self.record(Change::AnswerDelete(id));
                for chunk in 0..*chunks {
                    self.record(Change::SendDelete(&chunk_key(id, chunk)));
                }
                // Accepted since the last checkpoint started, nothing of the message is below.
                if *seq > self.layers.live.base_inbox_last {
                    return Ok(Planned::Finish(None));
                }
                let sends = (0..*chunks).map(|c| {
                    let key = chunk_key(id, c);
                    self.below(|o| &o.sends, key.as_str(), |base| base.has_send(&key))
                });
                Planned::Finish(Some(FinishInBase {
                    message: self.below(|o| &o.inbox, seq, |base| base.has_message(*seq))?,
                    attempts: self.below(|o| &o.attempts, seq, |base| Ok(base.attempts(*seq)?.is_some()))?,
                    answer: self.below(|o| &o.answers, id.as_str(), |base| base.has_answer(id))?,
                    sends: sends.collect::<Result<_, _>>()?,
                }))
            }
            Op::Shipped { through } => {
                self.record(Change::OutboxDeleteThrough(*through));
                let upto = (*through).min(self.layers.live.base_outbox_last);
                let base_stages = self.stages_below(self.shipped_through, upto)?;
                self.shipped_through = self.shipped_through.max(upto);
                Planned::Shipped { base_stages }
            }
            Op::PruneSeen { before_ms } => {
                self.record(Change::SeenPrune(*before_ms));
                Planned::Done
            }
        })
    }
}

/// Applies one planned operation to the overlay, moving its data in.
fn apply(overlay: &mut Overlay, op: Op, planned: Planned) {
    let add_stages = |overlay: &mut Overlay, first: u64, events: Vec<Vec<u8>>| {
        overlay.stages += events.len() as u64;
        overlay.outbox.extend((first..).zip(events.into_iter().map(bytes::Bytes::from)));
    };
    match (op, planned) {
        (Op::Accept { dedupe_key, now_ms, message, trace }, Planned::Accepted { seq, first_stage }) => {
            overlay.seen.insert(dedupe_key, now_ms);
            overlay.inbox.insert(seq, Some(message));
            overlay.messages += 1;
            add_stages(overlay, first_stage, trace);
        }
        (Op::Trace(events), Planned::Stages { first }) => add_stages(overlay, first, events),
        (Op::Answer { id, text }, _) => {
            overlay.answers.insert(id, Some(text));
        }
        (Op::Send { id, chunk, state }, _) => {
            overlay.sends.insert(chunk_key(&id, chunk), Some(state as u8));
        }
        (Op::Resume { seq }, Planned::Attempt(n)) => {
            overlay.attempts.insert(seq, Some(n));
        }
        (Op::Finish { seq, id, chunks }, Planned::Finish(in_base)) => {
            let in_base = in_base.as_ref();
            if Overlay::delete(&mut overlay.inbox, seq, in_base.is_some_and(|b| b.message)) {
                overlay.messages = overlay.messages.saturating_sub(1);
            }
            Overlay::delete(&mut overlay.attempts, seq, in_base.is_some_and(|b| b.attempts));
            for chunk in 0..chunks {
                let held = in_base.is_some_and(|b| b.sends[chunk as usize]);
                Overlay::delete(&mut overlay.sends, chunk_key(&id, chunk), held);
            }
            Overlay::delete(&mut overlay.answers, id, in_base.is_some_and(|b| b.answer));
        }
        (Op::Shipped { through }, Planned::Shipped { base_stages }) => {
            let kept = overlay.outbox.split_off(&through.saturating_add(1));
            let shipped = std::mem::replace(&mut overlay.outbox, kept).len() as u64;
            overlay.stages = overlay.stages.saturating_sub(shipped + base_stages);
            overlay.shipped_through = overlay.shipped_through.max(through.min(overlay.base_outbox_last));
        }
        (Op::PruneSeen { before_ms }, _) => {
            overlay.seen.retain(|_, at| *at >= before_ms);
            overlay.prune_seen_before = Some(overlay.prune_seen_before.map_or(before_ms, |b| b.max(before_ms)));
        }
        _ => {}
    }
}

impl Writer {
    /// Takes whatever requests are waiting and commits them as one group after the deferred
    /// operations; deferred operations alone wait up to [`DEFER_AT_MOST`] for company. Starts
    /// checkpoints when due, and drops the frozen overlay when one reports it committed.
    pub fn run(mut self, rx: mpsc::Receiver<Message>) {
        let mut deferred: Vec<Op> = Vec::new();
        let mut due = Due::default();
        let mut closing = false;
        while !closing {
            let received = match due.next(self.checkpoint.as_ref()) {
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            let mut group = Vec::new();
            let mut ops = deferred.len();
            match received {
                Ok(message) => closing = self.receive(message, &mut group, &mut ops, &mut due),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => closing = true,
            }
            while ops < MAX_GROUP && !closing {
                match rx.try_recv() {
                    Ok(message) => closing = self.receive(message, &mut group, &mut ops, &mut due),
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
            let asked = group.iter_mut().filter(|r| r.checkpoint).filter_map(|r| r.reply.take());
            self.asked.extend(asked);
            let now = Instant::now();
            let deferred_due = due.deferred_since.is_some_and(|since| now >= since + DEFER_AT_MOST);
            if !group.is_empty() || deferred_due {
                due.deferred_since = None;
                let started = Instant::now();
                if self.commit(&mut deferred, group) {
                    due.unchecked_since.get_or_insert(started);
                }
                if !deferred.is_empty() {
                    // Not committed: tried again with the next group, or on their own.
                    due.deferred_since = Some(Instant::now());
                }
                self.timings.commits.observe(started.elapsed());
            }
            self.checkpoint_if_due(&mut due);
        }
        self.close(&rx, &mut deferred, &mut due);
    }

    /// Handles one message; returns whether the spool is closing.
    fn receive(&mut self, message: Message, group: &mut Vec<Request>, ops: &mut usize, due: &mut Due) -> bool {
        match message {
            Message::Request(request) => {
                *ops += request.ops.len();
                group.push(request);
            }
            Message::Checkpointed(result) => self.checkpointed(result, due),
            Message::Close => return true,
        }
        false
    }

    /// Starts a checkpoint if one is due or asked for and none is running; tries a failed one
    /// again once it may.
    fn checkpoint_if_due(&mut self, due: &mut Due) {
        let now = Instant::now();
        if let Some(failed) = self.failed.get() {
            // Stopped for good (see `Writer::failed`): nothing more is checkpointed, or retried.
            reply_to(std::mem::take(&mut self.asked), || Err(SpoolError::Storage(failed.clone())));
            (due.unchecked_since, due.retry_at) = (None, None);
            return;
        }
        match &self.checkpoint {
            Some(checkpoint) if !checkpoint.running && due.retry_allowed(now) => self.run_checkpoint(due),
            Some(_) => {}
            None => {
                let full = self.log.offset >= log::CHECKPOINT_BYTES;
                let old = due.unchecked_since.is_some_and(|since| now >= since + CHECKPOINT_EVERY);
                let changed = due.unchecked_since.is_some() && due.retry_allowed(now);
                if !self.asked.is_empty() || (changed && (full || old)) {
                    if self.freeze() {
                        due.unchecked_since = None;
                        self.run_checkpoint(due);
                    } else {
                        due.retry_at = Some(now + CHECKPOINT_EVERY);
                    }
                }
            }
        }
    }

    /// Freezes the live overlay for a checkpoint and starts the log's next round, for what
    /// follows; the callers waiting for a checkpoint wait for this one. Refused (the callers
    /// answered) if the log cannot be written.
    fn freeze(&mut self) -> bool {
        let round = match self.log.next_round() {
            Ok(round) => round,
            Err(e) => {
                tracing::error!(error = %e, "spool checkpoint not started: the log cannot be written");
                let refused = || Err(storage(format!("the spool log cannot be written: {e}")));
                reply_to(std::mem::take(&mut self.asked), refused);
                return false;
            }
        };
        let numbers = (self.next_inbox - 1, self.next_outbox - 1);
        let layer = self.layers.write().expect("spool overlay poisoned").freeze(numbers);
        let asked = std::mem::take(&mut self.asked);
        self.checkpoint = Some(Checkpoint { layer, round, asked, started: Instant::now(), running: false });
        true
    }

    /// Writes the frozen overlay to the base on a thread of its own, which reports back.
    fn run_checkpoint(&mut self, due: &mut Due) {
        let checkpoint = self.checkpoint.as_mut().expect("a checkpoint to run");
        checkpoint.running = true;
        let (db, layer, round) = (self.db.clone(), checkpoint.layer.clone(), checkpoint.round);
        let (failed, messages) = (self.failed.clone(), self.messages.clone());
        let spawned = std::thread::Builder::new().name("omni-spool-checkpoint".into()).spawn(move || {
            let written = std::panic::catch_unwind(AssertUnwindSafe(|| write_checkpoint(&db, &layer, round, &failed)));
            // Released before reporting: once the writer hears of it, closing may release the file.
            drop((db, layer));
            let result = written.unwrap_or_else(|_| {
                // Whether its commit reached the disk is unknown, as when one fails.
                let stopped = "a spool checkpoint panicked; the node must be restarted".to_owned();
                let _ = failed.set(stopped.clone());
                Err(SpoolError::Storage(stopped))
            });
            let _ = messages.send(Message::Checkpointed(result));
        });
        if let Err(e) = spawned {
            self.checkpointed(Err(storage(format!("could not start a checkpoint thread: {e}"))), due);
        }
    }

    /// A checkpoint's outcome: once committed, the base holds the frozen overlay, which is
    /// dropped; else it stays below the live one and is written again later.
    fn checkpointed(&mut self, result: Result<(u64, u64), SpoolError>, due: &mut Due) {
        let Some(mut checkpoint) = self.checkpoint.take() else { return };
        self.timings.checkpoints.observe(checkpoint.started.elapsed());
        match result {
            Ok(last_keys) => {
                self.layers.write().expect("spool overlay poisoned").checkpointed(last_keys);
                // The planner's snapshot is of the base before it, and holds its pages.
                self.base = None;
                due.retry_at = None;
                reply_to(checkpoint.asked, || Ok(Vec::new()));
            }
            Err(e) => {
                if self.failed.get().is_some() {
                    tracing::error!(error = %e, "spool stopped");
                } else {
                    tracing::error!(error = %e, "spool checkpoint failed");
                }
                // Not again at once: redb may refuse every transaction until reopened.
                let now = Instant::now();
                due.retry_at = Some(now + CHECKPOINT_EVERY);
                let waiting = std::mem::take(&mut checkpoint.asked).into_iter().chain(std::mem::take(&mut self.asked));
                reply_to(waiting, || Err(storage(&e)));
                (checkpoint.running, checkpoint.started) = (false, now);
                self.checkpoint = Some(checkpoint);
            }
        }
    }

    /// Closing: whatever is deferred, the running checkpoint's end, then the rest written to the
    /// base here, so the next start has nothing to redo.
    fn close(&mut self, rx: &mpsc::Receiver<Message>, deferred: &mut Vec<Op>, due: &mut Due) {
        self.commit(deferred, Vec::new());
        while self.checkpoint.as_ref().is_some_and(|c| c.running) {
            match rx.recv() {
                Ok(Message::Checkpointed(result)) => self.checkpointed(result, due),
                Ok(_) => {}
                Err(_) => return,
            }
        }
        // One left by a failed checkpoint first, then the live overlay.
        if self.checkpoint.is_some() && !self.checkpoint_here(due) {
            return;
        }
        if self.failed.get().is_none() && self.freeze() {
            self.checkpoint_here(due);
        }
    }

    /// Writes the frozen overlay to the base on this thread; returns whether it committed.
    fn checkpoint_here(&mut self, due: &mut Due) -> bool {
        let checkpoint = self.checkpoint.as_ref().expect("a frozen overlay");
        if self.failed.get().is_some() {
            return false;
        }
        let result = write_checkpoint(&self.db, &checkpoint.layer, checkpoint.round, &self.failed);
        let committed = result.is_ok();
        self.checkpointed(result, due);
        committed
    }

    fn base(&mut self) -> Result<&Base, SpoolError> {
        if self.base.is_none() {
            self.base = Some(Base::open(&self.db.begin_read().map_err(storage)?)?);
        }
        Ok(self.base.as_ref().expect("just opened"))
    }

    /// Commits `deferred` (taken from it once committed) and one group: durable (a log frame)
    /// when a request waits for it, else to the overlay only. Returns whether anything changed.
    fn commit(&mut self, deferred: &mut Vec<Op>, group: Vec<Request>) -> bool {
        if let Some(failed) = self.failed.get() {
            // Refused like the rest, and not kept: they would wait for a commit that never comes.
            deferred.clear();
            reply_all(group, || Err(SpoolError::Storage(failed.clone())));
            return false;
        }
        if deferred.is_empty() && group.iter().all(|r| r.ops.is_empty()) {
            reply_all(group, || Ok(Vec::new()));
            return false;
        }
        let layers = self.layers.clone();
        let numbers = (self.next_inbox, self.next_outbox);
        let mut deferred_failed = None;
        let planned = match self.base() {
            Ok(base) => {
                let view = layers.read().expect("spool overlay poisoned");
                match plan(&view, base, numbers, deferred, &group) {
                    // The waiting requests are not to fail for operations nobody waits for.
                    Err(e) if !deferred.is_empty() => {
                        deferred_failed = Some(e);
                        plan(&view, base, numbers, &[], &group)
                    }
                    planned => planned,
                }
            }
            Err(e) => Err(e),
        };
        if planned.is_err() {
            // The group failed on its own: the deferred operations are not to blame.
            deferred_failed = None;
        }
        if let Some(e) = &deferred_failed {
            // Tried again later on a fresh snapshot, and dropped if they keep failing, as a crash
            // would have lost them: a message not marked finished is resumed and finished again,
            // stages not marked shipped are shipped again, and deferred trace stages are lost.
            self.base = None;
            self.deferred_failures += 1;
            if self.deferred_failures >= 3 {
                tracing::error!(error = %e, dropped = deferred.len(), "deferred spool operations failed");
                deferred.clear();
                self.deferred_failures = 0;
            } else {
                tracing::warn!(error = %e, "deferred spool operations failed; trying again later");
            }
        }
        let mut plan = match planned {
            Ok(plan) => plan,
            Err(e) => {
                tracing::error!(error = %e, "spool commit failed");
                self.base = None;
                reply_all(group, || Err(SpoolError::Storage(e.to_string())));
                return false;
            }
        };
        if let Some(frame) = plan.frame.as_mut().filter(|frame| !frame.is_empty())
            && let Err(e) = self.log.append(frame)
        {
            // Nothing was applied: the next group takes the frame's place and numbers, and the
            // deferred operations are tried again.
            tracing::error!(error = %e, "spool log write failed");
            reply_all(group, || Err(SpoolError::Storage(e.to_string())));
            return false;
        }
        let deferred = if deferred_failed.is_none() {
            self.deferred_failures = 0;
            std::mem::take(deferred)
        } else {
            Vec::new()
        };
        let changed = !deferred.is_empty() || group.iter().any(|r| !r.ops.is_empty());
        let stages_before = self.next_outbox;
        let mut planned = plan.planned.into_iter();
        let mut answers = Vec::with_capacity(group.len());
        {
            let mut layers = layers.write().expect("spool overlay poisoned");
            let overlay = &mut layers.live;
            for op in deferred {
                apply(overlay, op, planned.next().expect("one plan per operation"));
            }
            for request in group {
                let mut outcomes = Vec::with_capacity(request.ops.len());
                for op in request.ops {
                    let planned = planned.next().expect("one plan per operation");
                    outcomes.push(planned.outcome());
                    apply(overlay, op, planned);
                }
                answers.push((request.reply, outcomes));
            }
        }
        (self.next_inbox, self.next_outbox) = (plan.next_inbox, plan.next_outbox);
        if self.next_outbox > stages_before {
            self.traces_added.notify_one();
        }
        for (reply, outcomes) in answers {
            reply.map(|reply| reply.send(Ok(outcomes)));
        }
        changed
    }
}

/// Writes a frozen overlay to the base in one durable transaction that records the log's round
/// after it; returns the base's last message and stage numbers.
fn write_checkpoint(
    db: &Database,
    layer: &Overlay,
    round: Round,
    failed: &OnceLock<String>,
) -> Result<(u64, u64), SpoolError> {
    let txn = db.begin_write().map_err(storage)?;
    let last_keys = {
        let mut tables = Tables::open(&txn)?;
        tables.write(layer)?;
        tables.record_round(round)?;
        tables.last_keys()?
    };
    if let Err(e) = txn.commit() {
        // It may have reached the disk: the next start would then redo the log from the round
        // it recorded, and the frames appended meanwhile are in that round. But redb may not
        // take another transaction, and whether this one holds is unknown: nothing more is
        // accepted until a restart finds out.
        let stopped = format!("a spool checkpoint failed to commit ({e}); the node must be restarted");
        let _ = failed.set(stopped.clone());
        return Err(SpoolError::Storage(stopped));
    }
    Ok(last_keys)
}

fn reply_to(replies: impl IntoIterator<Item = Reply>, answer: impl Fn() -> Result<Vec<Outcome>, SpoolError>) {
    for reply in replies {
        let _ = reply.send(answer());
    }
}

fn reply_all(group: Vec<Request>, answer: impl Fn() -> Result<Vec<Outcome>, SpoolError>) {
    for request in group {
        request.reply.map(|reply| reply.send(answer()));
    }
}
