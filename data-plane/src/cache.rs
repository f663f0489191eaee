//! The last applied config on disk, so a node restarted while the control plane is down starts
//! serving at once. It holds tenant secrets, so it is encrypted (AES-256-GCM-SIV under the node's
//! cache key) and owner-only, written whole (temp file, fsync, rename) and only after a
//! successful apply. A cache that does not open is discarded, never trusted.

use crate::config::{Config, Limits};
use omni_core::crypto::Keyring;
use omni_proto::v1 as pb;
use prost::Message;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Associated data binding the ciphertext to its purpose.
const CONTEXT: &str = "omni-node-config-cache/v1";

pub struct ConfigCache {
    path: PathBuf,
    keyring: Keyring,
}

impl ConfigCache {
    pub fn new(path: PathBuf, keyring: Keyring) -> ConfigCache {
        ConfigCache { path, keyring }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached config, or `None` when there is none or it cannot be trusted (then the file is
    /// moved aside and the reason logged).
    pub fn load(&self, limits: Limits) -> Option<Config> {
        let sealed = match std::fs::read_to_string(&self.path) {
            Ok(sealed) => sealed,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "config cache unreadable; starting without it");
                return None;
            }
        };
        let decoded = self
            .keyring
            .open_bytes(CONTEXT, sealed.trim())
            .map_err(|e| e.to_string())
            .and_then(|bytes| pb::ConfigCache::decode(bytes.as_slice()).map_err(|e| e.to_string()))
            .and_then(|cache| {
                Config::from_snapshot(cache.revision, cache.instances, limits).map_err(|e| e.to_string())
            });
        match decoded {
            Ok(config) => Some(config),
            Err(reason) => {
                let aside = self.path.with_extension("corrupt");
                let _ = std::fs::rename(&self.path, &aside);
                tracing::warn!(path = %self.path.display(), moved_to = %aside.display(), %reason, "config cache discarded");
                None
            }
        }
    }

    /// Writes `config` atomically. Blocking: call from a blocking thread.
    pub fn save(&self, config: &Config) -> std::io::Result<()> {
        let cache = pb::ConfigCache {
            revision: config.revision,
            instances: config.instances.values().map(|i| i.as_ref().clone()).collect(),
        };
        let sealed = self.keyring.seal_bytes(CONTEXT, &cache.encode_to_vec());
        let temp = self.path.with_extension("tmp");
        {
            let mut file =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(sealed.as_bytes())?;
            file.sync_all()?;
        }
        std::fs::rename(&temp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Keeps the cache at the latest applied revision. Writes are coalesced: if several revisions
/// apply while one is being written, only the newest is written next. When `stop` fires, the
/// latest revision is written (if it is not yet) before returning.
pub async fn write_behind(
    cache: Arc<ConfigCache>,
    handle: Arc<crate::config::ConfigHandle>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut applied = handle.subscribe();
    let mut written = handle.revision();
    loop {
        let stopping = tokio::select! {
            changed = applied.changed() => changed.is_err(),
            _ = stop.wait_for(|s| *s) => true,
        };
        if let Some(config) = handle.load().filter(|c| c.revision != written) {
            let cache = cache.clone();
            let revision = config.revision;
            match tokio::task::spawn_blocking(move || cache.save(&config)).await {
                Ok(Ok(())) => written = revision,
                Ok(Err(e)) => tracing::warn!(error = %e, revision, "could not write the config cache"),
                Err(e) => tracing::warn!(error = %e, "config cache writer panicked"),
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let instance = pb::InstanceConfig {
            id: "id-a".into(),
            name: "acme-wa".into(),
            channel: pb::Channel::Whatsapp as i32,
            agent: Some(pb::NodeAgent {
                url: "http://127.0.0.1:9000".into(),
                key: "agent-secret".into(),
                ..Default::default()
            }),
            webhook_token: "hook-token".into(),
            require_webhook_token: true,
            ..Default::default()
        };
        Config::from_snapshot(42, vec![instance], Limits::default()).unwrap()
    }

    fn cache(dir: &Path) -> ConfigCache {
        ConfigCache::new(dir.join("config.cache"), Keyring::parse(&Keyring::generate_encoded()).unwrap())
    }

    #[test]
    fn round_trip_encrypted_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        assert!(cache.load(Limits::default()).is_none());
        cache.save(&config()).unwrap();
        let on_disk = std::fs::read_to_string(cache.path()).unwrap();
        assert!(!on_disk.contains("agent-secret") && !on_disk.contains("acme-wa"));
        assert_eq!(std::fs::metadata(cache.path()).unwrap().permissions().mode() & 0o777, 0o600);
        let loaded = cache.load(Limits::default()).unwrap();
        assert_eq!(loaded.revision, 42);
        assert_eq!(loaded.instances["acme-wa"].agent.as_ref().unwrap().key, "agent-secret");
    }

    #[test]
    fn a_corrupt_or_foreign_cache_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let cache_a = cache(dir.path());
        cache_a.save(&config()).unwrap();
        // Another key cannot open it.
        assert!(cache(dir.path()).load(Limits::default()).is_none());
        assert!(!cache_a.path().exists(), "moved aside");
        assert!(dir.path().join("config.corrupt").exists());
        std::fs::write(cache_a.path(), "garbage").unwrap();
        assert!(cache_a.load(Limits::default()).is_none());
    }
}
