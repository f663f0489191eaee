//! The control plane's stop signal. A graceful gRPC shutdown waits for every open stream, so
//! the long-lived ones end themselves on it: trace tails at once, node config streams once the
//! sends under way on them have reported ([`DRAIN`]), health watches once told NOT_SERVING.
//! Whatever is still open after [`GRACE`] is cut off.

use std::time::Duration;
use tokio::sync::watch;

/// How long requests still running at a stop may take to finish.
pub const GRACE: Duration = Duration::from_secs(10);

/// How long a node's config stream stays open after a stop for the sends under way on it to
/// report (their callers wait for the outcome), within [`GRACE`].
pub const DRAIN: Duration = Duration::from_secs(8);

/// Resolves once the control plane is stopping.
#[derive(Clone, Debug)]
pub struct Stopping(watch::Receiver<bool>);

impl Stopping {
    /// A signal and what it is sent to.
    pub fn channel() -> (watch::Sender<bool>, Stopping) {
        let (stop, stopped) = watch::channel(false);
        (stop, Stopping(stopped))
    }

    /// Waits until the stop is signalled; forever if its sender is gone without one.
    pub async fn wait(mut self) {
        if self.0.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
