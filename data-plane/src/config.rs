//! The node's view of tenant configuration, and how a revision is applied: validated whole,
//! built as a new value and swapped in atomically, so readers never see half a revision.

use arc_swap::ArcSwapOption;
use omni_core::names::validate_instance_name;
use omni_proto::v1::{self as pb, config_event};
use std::collections::HashMap;
use std::sync::Arc;
use thiserror::Error;

/// One applied revision of the whole config.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub revision: i64,
    pub instances: HashMap<String, Arc<pb::InstanceConfig>>,
}

#[derive(Debug, Error, PartialEq)]
pub enum ApplyError {
    /// The changes do not start where this config stands: the node must resync.
    #[error("changes start at revision {from}, but the node holds {held}")]
    Gap { from: i64, held: i64 },
    /// The revision is well-formed but this node will not run it; it keeps its previous config.
    #[error("{0}")]
    Rejected(String),
}

/// What this node agrees to run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_instances: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_instances: 1_000_000 }
    }
}

fn rejected(message: String) -> ApplyError {
    ApplyError::Rejected(message)
}

/// Checks one instance before it may be served.
pub fn validate_instance(instance: &pb::InstanceConfig) -> Result<(), ApplyError> {
    let name = &instance.name;
    validate_instance_name(name).map_err(|e| rejected(e.to_string()))?;
    let channel = pb::Channel::try_from(instance.channel)
        .ok()
        .filter(|c| *c != pb::Channel::Unspecified)
        .ok_or_else(|| rejected(format!("instance {name:?}: unknown channel {}", instance.channel)))?;
    let agent = instance.agent.as_ref().ok_or_else(|| rejected(format!("instance {name:?}: no agent")))?;
    let url: http::Uri =
        agent.url.parse().map_err(|_| rejected(format!("instance {name:?}: agent url {:?} is invalid", agent.url)))?;
    if !matches!(url.scheme_str(), Some("http" | "https")) {
        return Err(rejected(format!("instance {name:?}: agent url must be http or https")));
    }
    if instance.require_webhook_token && instance.webhook_token.is_empty() && channel != pb::Channel::Discord {
        return Err(rejected(format!("instance {name:?}: webhook token missing")));
    }
    Ok(())
}

impl Config {
    /// A config made of a whole snapshot.
    pub fn from_snapshot(
        revision: i64,
        instances: Vec<pb::InstanceConfig>,
        limits: Limits,
    ) -> Result<Config, ApplyError> {
        if instances.len() > limits.max_instances {
            return Err(rejected(format!(
                "{} instances exceed this node's limit of {}",
                instances.len(),
                limits.max_instances
            )));
        }
        let mut map = HashMap::with_capacity(instances.len());
        for instance in instances {
            validate_instance(&instance)?;
            map.insert(instance.name.clone(), Arc::new(instance));
        }
        Ok(Config { revision, instances: map })
    }

    /// The config after `changes`, or why they cannot apply. `self` is untouched either way.
    pub fn apply_changes(&self, changes: pb::ConfigChanges, limits: Limits) -> Result<Config, ApplyError> {
        if changes.from_revision != self.revision {
            return Err(ApplyError::Gap { from: changes.from_revision, held: self.revision });
        }
        if changes.to_revision <= changes.from_revision {
            return Err(rejected(format!("empty revision range {}..{}", changes.from_revision, changes.to_revision)));
        }
        let mut next = self.instances.clone();
        let mut last = changes.from_revision;
        for event in changes.events {
            if event.revision < last || event.revision > changes.to_revision || event.revision <= changes.from_revision
            {
                return Err(rejected(format!("event at revision {} is out of order", event.revision)));
            }
            last = event.revision;
            match event.kind {
                Some(config_event::Kind::Upsert(instance)) => {
                    validate_instance(&instance)?;
                    next.insert(instance.name.clone(), Arc::new(instance));
                }
                Some(config_event::Kind::Delete(name)) => {
                    next.remove(&name);
                }
                None => return Err(rejected(format!("event at revision {} has no content", event.revision))),
            }
        }
        if next.len() > limits.max_instances {
            return Err(rejected(format!(
                "{} instances exceed this node's limit of {}",
                next.len(),
                limits.max_instances
            )));
        }
        Ok(Config { revision: changes.to_revision, instances: next })
    }
}

/// The config every task reads: lock-free loads, atomic swaps. Empty until a config is applied
/// (from the cache or the control plane), which is what readiness means.
#[derive(Debug, Default)]
pub struct ConfigHandle {
    current: ArcSwapOption<Config>,
    applied: tokio::sync::watch::Sender<i64>,
}

impl ConfigHandle {
    pub fn new() -> ConfigHandle {
        ConfigHandle { current: ArcSwapOption::empty(), applied: tokio::sync::watch::Sender::new(0) }
    }

    pub fn load(&self) -> Option<Arc<Config>> {
        self.current.load_full()
    }

    /// The applied revision, 0 before any.
    pub fn revision(&self) -> i64 {
        self.current.load().as_ref().map_or(0, |c| c.revision)
    }

    pub fn store(&self, config: Config) -> Arc<Config> {
        let config = Arc::new(config);
        let revision = config.revision;
        self.current.store(Some(config.clone()));
        self.applied.send_replace(revision);
        config
    }

    /// Wakes on every swap; for the cache writer and anyone waiting for a revision.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<i64> {
        self.applied.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(name: &str, revision: i64) -> pb::InstanceConfig {
        pb::InstanceConfig {
            id: format!("id-{name}"),
            name: name.into(),
            channel: pb::Channel::Whatsapp as i32,
            active: true,
            revision,
            agent: Some(pb::NodeAgent { url: "http://127.0.0.1:9000".into(), ..Default::default() }),
            webhook_token: "token".into(),
            require_webhook_token: true,
            ..Default::default()
        }
    }

    fn upsert(revision: i64, name: &str) -> pb::ConfigEvent {
        pb::ConfigEvent { revision, kind: Some(config_event::Kind::Upsert(instance(name, revision))) }
    }

    fn delete(revision: i64, name: &str) -> pb::ConfigEvent {
        pb::ConfigEvent { revision, kind: Some(config_event::Kind::Delete(name.into())) }
    }

    #[test]
    fn changes_apply_on_top_of_a_snapshot() {
        let base = Config::from_snapshot(3, vec![instance("a", 1), instance("b", 3)], Limits::default()).unwrap();
        let next = base
            .apply_changes(
                pb::ConfigChanges { from_revision: 3, to_revision: 5, events: vec![upsert(4, "c"), delete(5, "a")] },
                Limits::default(),
            )
            .unwrap();
        assert_eq!(next.revision, 5);
        let mut names: Vec<_> = next.instances.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(base.instances.len(), 2, "the previous config is untouched");
    }

    #[test]
    fn a_gap_is_detected() {
        let base = Config::from_snapshot(3, vec![], Limits::default()).unwrap();
        let err = base
            .apply_changes(
                pb::ConfigChanges { from_revision: 4, to_revision: 5, events: vec![upsert(5, "c")] },
                Limits::default(),
            )
            .unwrap_err();
        assert_eq!(err, ApplyError::Gap { from: 4, held: 3 });
    }

    #[test]
    fn an_invalid_revision_is_rejected_whole() {
        let base = Config::from_snapshot(3, vec![instance("a", 1)], Limits::default()).unwrap();
        let mut bad = instance("b", 4);
        bad.agent = Some(pb::NodeAgent { url: "ftp://x".into(), ..Default::default() });
        let err = base
            .apply_changes(
                pb::ConfigChanges {
                    from_revision: 3,
                    to_revision: 4,
                    events: vec![
                        delete(4, "a"),
                        pb::ConfigEvent { revision: 4, kind: Some(config_event::Kind::Upsert(bad)) },
                    ],
                },
                Limits::default(),
            )
            .unwrap_err();
        assert!(matches!(err, ApplyError::Rejected(_)), "{err:?}");
        let limited = base.apply_changes(
            pb::ConfigChanges { from_revision: 3, to_revision: 4, events: vec![upsert(4, "b")] },
            Limits { max_instances: 1 },
        );
        assert_eq!(limited.unwrap_err(), ApplyError::Rejected("2 instances exceed this node's limit of 1".into()));
        let out_of_order = base.apply_changes(
            pb::ConfigChanges { from_revision: 3, to_revision: 5, events: vec![upsert(5, "b"), upsert(4, "c")] },
            Limits::default(),
        );
        assert!(matches!(out_of_order, Err(ApplyError::Rejected(_))));
    }

    #[test]
    fn the_handle_swaps_whole_configs() {
        let handle = ConfigHandle::new();
        assert!(handle.load().is_none());
        assert_eq!(handle.revision(), 0);
        let mut applied = handle.subscribe();
        handle.store(Config::from_snapshot(7, vec![instance("a", 7)], Limits::default()).unwrap());
        assert_eq!(handle.revision(), 7);
        assert!(applied.has_changed().unwrap());
        assert_eq!(*applied.borrow_and_update(), 7);
    }
}
