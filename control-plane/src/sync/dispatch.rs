//! Work the control plane hands to connected nodes over their config streams (messages to send
//! for `MessageService`), and the results the nodes send back on the same streams.

use omni_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Error)]
pub enum DispatchError {
    #[error("no data-plane node with the instance's current config is connected")]
    NoNode,
    /// Results survive a node's reconnection (it reports them on its next stream), so only
    /// time tells that one is not coming.
    #[error("node {0} did not report the outcome within {1:?}; the message may have been sent")]
    Timeout(String, Duration),
}

/// One connected node's session, as the dispatcher sees it.
struct Link {
    commands: mpsc::Sender<pb::SendCommand>,
    applied: Arc<AtomicI64>,
}

#[derive(Default)]
pub struct Dispatcher {
    links: Mutex<HashMap<String, Link>>,
    pending: Mutex<HashMap<String, oneshot::Sender<pb::SendResult>>>,
    next: AtomicU64,
    /// Counts gateway lease releases, so that sessions offer the freed bots to their nodes
    /// without waiting for the next heartbeat.
    freed: tokio::sync::watch::Sender<u64>,
}

/// What a session holds: commands for its node, and where it records the applied revision.
pub struct Registration {
    pub commands: mpsc::Receiver<pb::SendCommand>,
    pub applied: Arc<AtomicI64>,
}

impl Dispatcher {
    /// A node handed its gateway leases back.
    pub fn leases_freed(&self) {
        self.freed.send_modify(|n| *n += 1);
    }

    pub fn watch_freed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.freed.subscribe()
    }

    pub fn register(&self, node_id: &str, applied_revision: i64) -> Registration {
        let (tx, commands) = mpsc::channel(64);
        let applied = Arc::new(AtomicI64::new(applied_revision));
        let link = Link { commands: tx, applied: applied.clone() };
        self.links.lock().expect("dispatcher lock").insert(node_id.to_owned(), link);
        Registration { commands, applied }
    }

    /// Forgets a session, unless a newer one of the same node replaced it.
    pub fn unregister(&self, node_id: &str, applied: &Arc<AtomicI64>) {
        let mut links = self.links.lock().expect("dispatcher lock");
        if links.get(node_id).is_some_and(|l| Arc::ptr_eq(&l.applied, applied)) {
            links.remove(node_id);
        }
    }

    /// Whether the session holding `applied` is still the node's newest.
    pub fn is_current(&self, node_id: &str, applied: &Arc<AtomicI64>) -> bool {
        self.links.lock().expect("dispatcher lock").get(node_id).is_some_and(|l| Arc::ptr_eq(&l.applied, applied))
    }

    /// A node whose applied config includes `revision`, taken in turn across calls.
    fn pick(&self, revision: i64) -> Option<(String, mpsc::Sender<pb::SendCommand>)> {
        let links = self.links.lock().expect("dispatcher lock");
        let mut ready: Vec<(&String, &Link)> =
            links.iter().filter(|(_, l)| l.applied.load(Ordering::Relaxed) >= revision).collect();
        if ready.is_empty() {
            return None;
        }
        ready.sort_by(|a, b| a.0.cmp(b.0));
        let turn = self.next.fetch_add(1, Ordering::Relaxed) as usize % ready.len();
        let (id, link) = ready[turn];
        Some((id.clone(), link.commands.clone()))
    }

    /// Hands `command` to a node that has `revision` applied and waits for its result.
    pub async fn send(
        &self,
        command: pb::SendCommand,
        revision: i64,
        timeout: Duration,
    ) -> Result<(String, pb::SendResult), DispatchError> {
        let (node_id, commands) = self.pick(revision).ok_or(DispatchError::NoNode)?;
        let (tx, rx) = oneshot::channel();
        let id = command.id.clone();
        self.pending.lock().expect("dispatcher lock").insert(id.clone(), tx);
        let _forget = Forget { dispatcher: self, id: &id };
        let delivered = async {
            if commands.send(command).await.is_err() {
                // The session ended between the pick and the send: nothing left the control plane.
                return Err(DispatchError::NoNode);
            }
            // The sender lives in `pending` until answered or forgotten.
            Ok(rx.await.expect("pending entries are removed only by their waiter"))
        };
        match tokio::time::timeout(timeout, delivered).await {
            Ok(result) => result.map(|result| (node_id, result)),
            Err(_) => Err(DispatchError::Timeout(node_id, timeout)),
        }
    }

    /// Whether the caller of command `id` still waits for its result.
    pub fn is_pending(&self, id: &str) -> bool {
        self.pending.lock().expect("dispatcher lock").contains_key(id)
    }

    /// A node's result for a command sent earlier.
    pub fn complete(&self, result: pb::SendResult) {
        if let Some(waiting) = self.pending.lock().expect("dispatcher lock").remove(&result.id) {
            let _ = waiting.send(result);
        }
    }
}

/// Drops a pending entry when its caller stops waiting.
struct Forget<'a> {
    dispatcher: &'a Dispatcher,
    id: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.dispatcher.pending.lock().expect("dispatcher lock").remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_reach_a_ready_node_and_results_come_back() {
        let dispatcher = Arc::new(Dispatcher::default());
        assert!(matches!(
            dispatcher.send(pb::SendCommand::default(), 1, Duration::from_secs(1)).await,
            Err(DispatchError::NoNode)
        ));
        let mut behind = dispatcher.register("behind", 1);
        let mut ready = dispatcher.register("ready", 5);
        let node = dispatcher.clone();
        tokio::spawn(async move {
            let command = ready.commands.recv().await.unwrap();
            node.complete(pb::SendResult { id: command.id, ok: true, ..Default::default() });
        });
        let command = pb::SendCommand { id: "c1".into(), ..Default::default() };
        let (node_id, result) = dispatcher.send(command, 5, Duration::from_secs(5)).await.unwrap();
        assert_eq!((node_id.as_str(), result.ok), ("ready", true));
        assert!(behind.commands.try_recv().is_err(), "the node without revision 5 got nothing");

        let _silent = dispatcher.register("silent", 9);
        let command = pb::SendCommand { id: "c2".into(), ..Default::default() };
        let timed_out = dispatcher.send(command, 9, Duration::from_millis(50)).await;
        assert!(matches!(timed_out, Err(DispatchError::Timeout(..))), "{timed_out:?}");
        assert!(dispatcher.pending.lock().unwrap().is_empty());
    }
}
