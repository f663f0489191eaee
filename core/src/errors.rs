//! Error text for people.

/// The innermost cause of an error: what actually went wrong (`connection refused`), where
/// the outer layers only say `error sending request`.
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}
