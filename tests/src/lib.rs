//! Test harness: isolated Postgres databases, the real Omni binaries as child processes, and
//! waiting for conditions with a deadline.

pub mod postgres;
pub mod process;

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` until it yields a value or `timeout` passes (then panics with `what`).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
