//! The writer thread, the spool's only writer. For each group of requests that arrived together
//! it plans their operations against the overlay and the base (dedupe, numbering), makes the
//! planned changes durable in one log frame, applies them to the overlay and answers. From time
//! to time it checkpoints: the overlay is written to the base in one durable transaction and the
//! log starts a new round.

use super::base::{Base, LOG_GROUP, LOG_SALT, Tables};
use super::log::{self, Change, Frame, Log};
use super::overlay::Overlay;
use super::{CHECKPOINT_EVERY, DEFER_AT_MOST, Op, Outcome, SpoolError, chunk_key, storage};
use omni_core::metrics::Histogram;
use redb::{Database, ReadableDatabase};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, RwLock, mpsc};
use std::time::Instant;
use tokio::sync::{Notify, oneshot};

/// Operations committed per group at most; more wait for the next one.
const MAX_GROUP: usize = 1024;

pub struct Request {
    pub ops: Vec<Op>,
    /// `None` for deferred operations: nobody waits for them.
    pub reply: Option<oneshot::Sender<Result<Vec<Outcome>, SpoolError>>>,
    /// Answered only once a checkpoint after the commit wrote everything to the base.
    pub checkpoint: bool,
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
    /// Only this thread changes it; others read it.
    pub overlay: Arc<RwLock<Overlay>>,
    /// The base as of the last checkpoint (dropped while one writes).
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
}

/// When the writer must act without being asked: deferred operations due, a checkpoint due.
#[derive(Default)]
struct Due {
    deferred_since: Option<Instant>,
    /// The first change not yet made durable by a checkpoint.
    unchecked_since: Option<Instant>,
    /// The last checkpoint that failed: a full log does not make the next one due before
    /// [`CHECKPOINT_EVERY`] has passed.
    checkpoint_failed: Option<Instant>,
}

impl Due {
    fn next(&self) -> Option<Instant> {
        let deferred = self.deferred_since.map(|t| t + DEFER_AT_MOST);
        let checkpoint = self.unchecked_since.map(|t| t + CHECKPOINT_EVERY);
        deferred.into_iter().chain(checkpoint).min()
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
    /// For a message accepted before the last checkpoint, which of its keys the base holds.
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

/// Plans one group. The overlay and the base are read, never written.
fn plan(
    overlay: &Overlay,
    base: &Base,
    (next_inbox, next_outbox): (u64, u64),
    deferred: &[Op],
    group: &[Request],
) -> Result<Plan, SpoolError> {
    let mut planner = Planner {
        overlay,
        base,
        next_inbox,
        next_outbox,
        shipped_through: overlay.shipped_through,
        seen: HashSet::new(),
        attempts: HashMap::new(),
        frame: (!group.is_empty()).then(Frame::default),
    };
    let ops = deferred.iter().chain(group.iter().flat_map(|r| &r.ops));
    let planned = ops.map(|op| planner.plan(op)).collect::<Result<Vec<_>, _>>()?;
    Ok(Plan { planned, next_inbox: planner.next_inbox, next_outbox: planner.next_outbox, frame: planner.frame })
}

struct Planner<'a> {
    overlay: &'a Overlay,
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
        if self.seen.contains(key) || self.overlay.seen.contains_key(key) {
            return Ok(true);
        }
        let pruned = |at: i64| self.overlay.prune_seen_before.is_some_and(|before| at < before);
        Ok(self.base.seen(key)?.is_some_and(|at| !pruned(at)))
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
                let before = match (self.attempts.get(seq), self.overlay.attempts.get(seq)) {
                    (Some(n), _) => *n,
                    (None, Some(n)) => n.unwrap_or(0),
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
                // Accepted since the checkpoint, nothing of the message is in the base.
                if *seq > self.overlay.base_inbox_last {
                    return Ok(Planned::Finish(None));
                }
                let base = self.base;
                Planned::Finish(Some(FinishInBase {
                    message: base.has_message(*seq)?,
                    attempts: base.attempts(*seq)?.is_some(),
                    answer: base.has_answer(id)?,
                    sends: (0..*chunks).map(|c| base.has_send(&chunk_key(id, c))).collect::<Result<_, _>>()?,
                }))
            }
            Op::Shipped { through } => {
                self.record(Change::OutboxDeleteThrough(*through));
                let upto = (*through).min(self.overlay.base_outbox_last);
                let base_stages = self.base.stages_in(self.shipped_through, upto)?;
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
    /// operations; deferred operations alone wait up to [`DEFER_AT_MOST`] for company.
    pub fn run(mut self, rx: mpsc::Receiver<Request>) {
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
            let asked: Vec<_> = group.iter_mut().filter(|r| r.checkpoint).filter_map(|r| r.reply.take()).collect();
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
            let retry_allowed = due.checkpoint_failed.is_none_or(|at| now >= at + CHECKPOINT_EVERY);
            let checkpoint_due = (self.log.offset >= log::CHECKPOINT_BYTES && retry_allowed)
                || due.unchecked_since.is_some_and(|since| now >= since + CHECKPOINT_EVERY);
            if !asked.is_empty() || (checkpoint_due && due.unchecked_since.is_some()) {
                let started = Instant::now();
                let checkpointed = self.checkpoint();
                match &checkpointed {
                    Ok(()) => (due.unchecked_since, due.checkpoint_failed) = (None, None),
                    // Stopped for good (see `Writer::failed`): nothing more to checkpoint.
                    Err(e) if self.failed.get().is_some() => {
                        tracing::error!(error = %e, "spool stopped");
                        (due.unchecked_since, due.checkpoint_failed) = (None, None);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "spool checkpoint failed");
                        // Not again at once: redb may refuse every transaction until reopened.
                        due.unchecked_since = Some(Instant::now());
                        due.checkpoint_failed = Some(Instant::now());
                    }
                }
                self.timings.commits.observe(started.elapsed());
                self.timings.checkpoints.observe(started.elapsed());
                for reply in asked {
                    let _ = reply.send(checkpointed.as_ref().map(|()| Vec::new()).map_err(storage));
                }
            }
        }
        // Closing: whatever is deferred, and a last checkpoint, so the next start has nothing to redo.
        self.commit(&mut deferred, Vec::new());
        if let Err(e) = self.checkpoint() {
            tracing::error!(error = %e, "spool checkpoint failed at close");
        }
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
        let overlay = self.overlay.clone();
        let numbers = (self.next_inbox, self.next_outbox);
        let mut deferred_failed = None;
        let planned = match self.base() {
            Ok(base) => {
                let view = overlay.read().expect("spool overlay poisoned");
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
            let mut overlay = overlay.write().expect("spool overlay poisoned");
            for op in deferred {
                apply(&mut overlay, op, planned.next().expect("one plan per operation"));
            }
            for request in group {
                let mut outcomes = Vec::with_capacity(request.ops.len());
                for op in request.ops {
                    let planned = planned.next().expect("one plan per operation");
                    outcomes.push(planned.outcome());
                    apply(&mut overlay, op, planned);
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

    /// Writes the overlay to the base in one durable transaction that also starts a new round
    /// of the log; the overlay starts over.
    pub fn checkpoint(&mut self) -> Result<(), SpoolError> {
        if let Some(failed) = self.failed.get() {
            return Err(SpoolError::Storage(failed.clone()));
        }
        // A read snapshot held open would keep the transaction from reusing pages.
        self.base = None;
        let salt = log::new_salt();
        let overlay = self.overlay.clone();
        let (inbox_last, outbox_last) = {
            // Read-locked only: nothing else changes the overlay, and readers go on meanwhile.
            let view = overlay.read().expect("spool overlay poisoned");
            let txn = self.db.begin_write().map_err(storage)?;
            let last_keys = {
                let mut tables = Tables::open(&txn)?;
                tables.write(&view)?;
                tables.meta.insert(LOG_GROUP, self.log.group).map_err(storage)?;
                tables.meta.insert(LOG_SALT, salt).map_err(storage)?;
                tables.last_keys()?
            };
            if let Err(e) = txn.commit() {
                // It may have reached the disk, with the new round's salt: frames appended under
                // the old one would then not be redone after a crash. Nothing more is accepted.
                let failed = format!("a spool checkpoint failed to commit ({e}); the node must be restarted");
                let _ = self.failed.set(failed.clone());
                return Err(SpoolError::Storage(failed));
            }
            last_keys
        };
        overlay.write().expect("spool overlay poisoned").checkpointed(inbox_last, outbox_last);
        self.log.restart(salt);
        Ok(())
    }
}

fn reply_all(group: Vec<Request>, answer: impl Fn() -> Result<Vec<Outcome>, SpoolError>) {
    for request in group {
        request.reply.map(|reply| reply.send(answer()));
    }
}
