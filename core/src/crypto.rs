//! Secrets at rest: AES-256-GCM-SIV under a master key, and the random tokens and hashes the
//! control plane hands out.
//!
//! Sealed form: `v1.<key id>.<base64url(nonce || ciphertext)>`. The key id lets an operator
//! rotate the master key: `OMNI_MASTER_KEY` may list several keys separated by commas; the first
//! seals, every one of them opens. Each secret is sealed with associated data naming the instance
//! id and the field, so a ciphertext copied into another row or field does not open.

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};
use std::fmt;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CryptoError {
    #[error("master key must be base64 of exactly 32 bytes")]
    BadMasterKey,
    #[error("no master key given")]
    NoMasterKey,
    #[error("sealed secret is malformed")]
    Malformed,
    #[error("secret was sealed with master key {0}, which is not configured")]
    UnknownKey(String),
    #[error("secret does not open with its master key (wrong key, or the data was altered)")]
    Open,
}

struct MasterKey {
    id: String,
    cipher: Aes256GcmSiv,
}

/// The configured master keys. Never printed: `Debug` shows only key ids.
pub struct Keyring {
    keys: Vec<MasterKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("Keyring").field("key_ids", &ids).finish()
    }
}

impl Keyring {
    /// Parses a comma-separated list of base64 32-byte keys; the first one seals.
    pub fn parse(list: &str) -> Result<Keyring, CryptoError> {
        let mut keys = Vec::new();
        for encoded in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bytes = STANDARD
                .decode(encoded)
                .or_else(|_| URL_SAFE_NO_PAD.decode(encoded))
                .map_err(|_| CryptoError::BadMasterKey)?;
            if bytes.len() != 32 {
                return Err(CryptoError::BadMasterKey);
            }
            let id = hex(&Sha256::new_with_prefix(b"omni-master-key-id\0").chain_update(&bytes).finalize()[..4]);
            let cipher = Aes256GcmSiv::new_from_slice(&bytes).map_err(|_| CryptoError::BadMasterKey)?;
            keys.push(MasterKey { id, cipher });
        }
        if keys.is_empty() {
            return Err(CryptoError::NoMasterKey);
        }
        Ok(Keyring { keys })
    }

    /// A fresh random master key, base64 encoded, for writing to a key file.
    pub fn generate_encoded() -> String {
        STANDARD.encode(random_bytes::<32>())
    }

    /// The id of the key that seals new secrets.
    pub fn current_key_id(&self) -> &str {
        &self.keys[0].id
    }

    pub fn seal(&self, context: &str, plaintext: &str) -> String {
        self.seal_bytes(context, plaintext.as_bytes())
    }

    pub fn open(&self, context: &str, sealed: &str) -> Result<String, CryptoError> {
        String::from_utf8(self.open_bytes(context, sealed)?).map_err(|_| CryptoError::Malformed)
    }

    pub fn seal_bytes(&self, context: &str, plaintext: &[u8]) -> String {
        let key = &self.keys[0];
        let nonce = random_bytes::<12>();
        let ciphertext = key
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: context.as_bytes() })
            .expect("AES-GCM-SIV encryption of an in-memory buffer cannot fail");
        let mut blob = Vec::with_capacity(12 + ciphertext.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ciphertext);
        format!("v1.{}.{}", key.id, URL_SAFE_NO_PAD.encode(blob))
    }

    pub fn open_bytes(&self, context: &str, sealed: &str) -> Result<Vec<u8>, CryptoError> {
        let mut parts = sealed.splitn(3, '.');
        let (Some("v1"), Some(key_id), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CryptoError::Malformed);
        };
        let key =
            self.keys.iter().find(|k| k.id == key_id).ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        let blob = URL_SAFE_NO_PAD.decode(body).map_err(|_| CryptoError::Malformed)?;
        if blob.len() < 12 {
            return Err(CryptoError::Malformed);
        }
        let (nonce, ciphertext) = blob.split_at(12);
        key.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: context.as_bytes() })
            .map_err(|_| CryptoError::Open)
    }
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::getrandom(&mut buf).expect("the operating system's random source is unavailable");
    buf
}

/// A random URL-safe token with 256 bits of entropy.
pub fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<32>())
}

/// Compares secrets without leaking, through timing, how much of them matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn sha256_hex(data: &str) -> String {
    hex(&Sha256::digest(data.as_bytes()))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring() -> (String, Keyring) {
        let encoded = Keyring::generate_encoded();
        let ring = Keyring::parse(&encoded).unwrap();
        (encoded, ring)
    }

    #[test]
    fn seal_and_open() {
        let (_, ring) = keyring();
        let sealed = ring.seal("instance:1:agent_key", "s3cret");
        assert!(sealed.starts_with(&format!("v1.{}.", ring.current_key_id())));
        assert!(!sealed.contains("s3cret"));
        assert_eq!(ring.open("instance:1:agent_key", &sealed).unwrap(), "s3cret");
        // A fresh nonce every time.
        assert_ne!(sealed, ring.seal("instance:1:agent_key", "s3cret"));
    }

    #[test]
    fn context_binds_the_ciphertext() {
        let (_, ring) = keyring();
        let sealed = ring.seal("instance:1:agent_key", "s3cret");
        assert!(matches!(ring.open("instance:2:agent_key", &sealed), Err(CryptoError::Open)));
        assert!(matches!(ring.open("instance:1:evolution_key", &sealed), Err(CryptoError::Open)));
    }

    #[test]
    fn tampering_is_detected() {
        let (_, ring) = keyring();
        let sealed = ring.seal("c", "s3cret");
        let mut bytes = sealed.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert!(ring.open("c", &tampered).is_err());
        assert!(matches!(ring.open("c", "nonsense"), Err(CryptoError::Malformed)));
    }

    #[test]
    fn rotation_keeps_old_secrets_readable() {
        let (old_encoded, old) = keyring();
        let sealed = old.seal("c", "s3cret");
        let new_encoded = Keyring::generate_encoded();
        let rotated = Keyring::parse(&format!("{new_encoded},{old_encoded}")).unwrap();
        assert_eq!(rotated.open("c", &sealed).unwrap(), "s3cret");
        assert_ne!(rotated.current_key_id(), old.current_key_id());
        let only_new = Keyring::parse(&new_encoded).unwrap();
        assert!(matches!(only_new.open("c", &sealed), Err(CryptoError::UnknownKey(_))));
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"token", b"token"));
        assert!(!constant_time_eq(b"token", b"tokeN"));
        assert!(!constant_time_eq(b"token", b"token2"));
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(matches!(Keyring::parse(""), Err(CryptoError::NoMasterKey)));
        assert!(matches!(Keyring::parse("c2hvcnQ="), Err(CryptoError::BadMasterKey)));
        assert!(matches!(Keyring::parse("!!!"), Err(CryptoError::BadMasterKey)));
        let (_, ring) = keyring();
        assert!(!format!("{ring:?}").contains("cipher"));
    }
}
