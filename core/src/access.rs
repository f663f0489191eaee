//! Access rules: who may talk to an instance's bot.
//!
//! A rule's pattern is an exact identity or a prefix ending in `*`. The most specific matching
//! rule decides (an exact rule beats a prefix of the same length, a longer prefix beats a shorter
//! one), block wins a tie, and the instance's default decides when nothing matches. A leading `+`
//! is ignored on both sides, so `+5511*` and `5511*` select the same phone numbers.

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Block,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Block => "block",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "allow" => Some(Action::Allow),
            "block" => Some(Action::Block),
            _ => None,
        }
    }
}

/// Longest accepted pattern; identities on every channel are far shorter.
pub const MAX_PATTERN_LEN: usize = 128;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("access pattern is empty")]
    Empty,
    #[error("access pattern is longer than {MAX_PATTERN_LEN} characters")]
    TooLong,
    #[error("access pattern {0:?} may contain '*' only as its last character")]
    Wildcard(String),
    #[error("access pattern {0:?} contains whitespace or control characters")]
    Charset(String),
}

pub fn validate_pattern(pattern: &str) -> Result<(), PatternError> {
    if pattern.is_empty() {
        return Err(PatternError::Empty);
    }
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(PatternError::TooLong);
    }
    if pattern.trim_end_matches('*').contains('*') || pattern.ends_with("**") {
        return Err(PatternError::Wildcard(pattern.to_owned()));
    }
    if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(PatternError::Charset(pattern.to_owned()));
    }
    Ok(())
}

fn strip_plus(s: &str) -> &str {
    s.strip_prefix('+').unwrap_or(s)
}

/// How specifically `pattern` matches `identity`, or `None` when it does not match.
/// Ordered so that a larger value is more specific.
fn specificity(pattern: &str, identity: &str) -> Option<(usize, bool)> {
    let identity = strip_plus(identity);
    match pattern.strip_suffix('*') {
        Some(prefix) => {
            let prefix = strip_plus(prefix);
            identity.starts_with(prefix).then_some((prefix.len(), false))
        }
        None => (strip_plus(pattern) == identity).then_some((identity.len(), true)),
    }
}

/// The decision for `identity`: the deciding rule's index in `rules` (None when the default
/// applied) and the action.
pub fn decide<'a, I>(rules: I, default: Action, identity: &str) -> (Option<usize>, Action)
where
    I: IntoIterator<Item = (&'a str, Action)>,
{
    let mut best: Option<((usize, bool), usize, Action)> = None;
    for (index, (pattern, action)) in rules.into_iter().enumerate() {
        let Some(score) = specificity(pattern, identity) else {
            continue;
        };
        let better = match best {
            None => true,
            Some((best_score, _, best_action)) => {
                score > best_score || (score == best_score && action == Action::Block && best_action == Action::Allow)
            }
        };
        if better {
            best = Some((score, index, action));
        }
    }
    match best {
        Some((_, index, action)) => (Some(index), action),
        None => (None, default),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    fn check(rules: &[(&str, Action)], default: Action, identity: &str) -> (Option<usize>, Action) {
        decide(rules.iter().copied(), default, identity)
    }

    #[test]
    fn longest_match_wins() {
        let rules = [("+5511*", Block), ("+551199*", Allow)];
        assert_eq!(check(&rules, Allow, "+5511991234567"), (Some(1), Allow));
        assert_eq!(check(&rules, Allow, "+5511881234567"), (Some(0), Block));
        assert_eq!(check(&rules, Allow, "+4911881234567"), (None, Allow));
        assert_eq!(check(&rules, Block, "+4911881234567"), (None, Block));
    }

    #[test]
    fn plus_is_ignored_on_both_sides() {
        let rules = [("+5511*", Block)];
        assert_eq!(check(&rules, Allow, "5511991234567"), (Some(0), Block));
        let rules = [("5511991234567", Block)];
        assert_eq!(check(&rules, Allow, "+5511991234567"), (Some(0), Block));
    }

    #[test]
    fn exact_beats_prefix_of_same_length_and_block_wins_ties() {
        let rules = [("12345*", Block), ("12345", Allow)];
        assert_eq!(check(&rules, Block, "12345"), (Some(1), Allow));
        let rules = [("123*", Allow), ("+123*", Block)];
        assert_eq!(check(&rules, Allow, "1234"), (Some(1), Block));
        let rules = [("+123*", Block), ("123*", Allow)];
        assert_eq!(check(&rules, Allow, "1234"), (Some(0), Block));
    }

    #[test]
    fn star_matches_everyone() {
        let rules = [("*", Block), ("+5511991234567", Allow)];
        assert_eq!(check(&rules, Allow, "+5511991234567"), (Some(1), Allow));
        assert_eq!(check(&rules, Allow, "+1"), (Some(0), Block));
    }

    #[test]
    fn patterns_are_validated() {
        assert_eq!(validate_pattern("+5511*"), Ok(()));
        assert_eq!(validate_pattern("*"), Ok(()));
        assert_eq!(validate_pattern("U024BE7LH"), Ok(()));
        assert_eq!(validate_pattern(""), Err(PatternError::Empty));
        assert!(matches!(validate_pattern("55*11"), Err(PatternError::Wildcard(_))));
        assert!(matches!(validate_pattern("55**"), Err(PatternError::Wildcard(_))));
        assert!(matches!(validate_pattern("55 11"), Err(PatternError::Charset(_))));
        assert_eq!(validate_pattern(&"1".repeat(200)), Err(PatternError::TooLong));
    }
}
