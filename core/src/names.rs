//! Instance names and the patterns that select them.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("instance name must be 1-63 characters, got {0}")]
    Length(usize),
    #[error("instance name {0:?} must be a lowercase DNS label: a-z, 0-9 and '-', not starting or ending with '-'")]
    Charset(String),
    #[error("instance pattern {0:?} must be an instance name, optionally ending in '*'")]
    Pattern(String),
}

/// Checks that `name` is a lowercase DNS label (RFC 1123): it appears in URLs and session names.
pub fn validate_instance_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > 63 {
        return Err(NameError::Length(name.len()));
    }
    let label_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !label_chars || name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::Charset(name.to_owned()));
    }
    Ok(())
}

/// Checks an API-key scope pattern: an instance name, a name prefix ending in `*`, or `*`.
pub fn validate_instance_pattern(pattern: &str) -> Result<(), NameError> {
    let prefix = pattern.strip_suffix('*').unwrap_or(pattern);
    let prefix_ok =
        prefix.len() <= 63 && prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !prefix_ok || (prefix.is_empty() && !pattern.ends_with('*')) {
        return Err(NameError::Pattern(pattern.to_owned()));
    }
    Ok(())
}

/// Whether `pattern` (exact, or prefix ending in `*`) selects instance `name`.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// A new trace id: a UUIDv7, time-ordered, so that traces and their stages are stored at the end
/// of the control plane's indexes instead of at random places in them (a random id touched a
/// different index page per trace, and the pages written per batch grew with the table).
pub fn new_trace_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The user id of `identity` on an instance: a UUIDv5 in the instance's own namespace, so the
/// same phone on two tenants is two users.
pub fn user_id(instance_id: &str, identity: &str) -> String {
    let namespace = uuid::Uuid::parse_str(instance_id)
        .unwrap_or_else(|_| uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, instance_id.as_bytes()));
    uuid::Uuid::new_v5(&namespace, identity.as_bytes()).to_string()
}

/// The agent session of a sender on an instance.
pub fn session_name(instance: &str, identity: &str) -> String {
    format!("{instance}_{identity}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_sort_in_the_order_they_were_made() {
        let ids: Vec<String> = (0..1000).map(|_| new_trace_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids made in one process sort by creation, as text");
        assert!(uuid::Uuid::parse_str(&ids[0]).is_ok_and(|id| id.get_version_num() == 7));
    }

    #[test]
    fn user_ids_are_per_instance() {
        let a = "6a2f41a3-c54c-4c2f-8a58-3b5b3b8c6a11";
        let b = "0d4bf0a6-1c70-4ad2-bb4c-6b7f3f0b9e22";
        assert_eq!(user_id(a, "5511999999999"), user_id(a, "5511999999999"));
        assert_ne!(user_id(a, "5511999999999"), user_id(b, "5511999999999"));
        assert_eq!(session_name("acme-wa", "5511"), "acme-wa_5511");
    }

    #[test]
    fn names() {
        for ok in ["a", "acme-wa", "x1", &"a".repeat(63)] {
            assert_eq!(validate_instance_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_instance_name(""), Err(NameError::Length(0)));
        assert!(matches!(validate_instance_name(&"a".repeat(64)), Err(NameError::Length(64))));
        for bad in ["Acme", "acme_wa", "-acme", "acme-", "ac me", "acmé", "a.b"] {
            assert!(matches!(validate_instance_name(bad), Err(NameError::Charset(_))), "{bad}");
        }
    }

    #[test]
    fn patterns() {
        for ok in ["*", "acme-*", "acme-wa", "a*"] {
            assert_eq!(validate_instance_pattern(ok), Ok(()), "{ok}");
        }
        for bad in ["", "ACME*", "acme%", "ac*me", "acme_*", "**"] {
            assert!(validate_instance_pattern(bad).is_err(), "{bad}");
        }
        assert!(pattern_matches("acme-*", "acme-wa"));
        assert!(pattern_matches("*", "anything"));
        assert!(pattern_matches("acme-wa", "acme-wa"));
        assert!(!pattern_matches("acme-wa", "acme-wa2"));
        assert!(!pattern_matches("acme-*", "other"));
    }
}
