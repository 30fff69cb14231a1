//! Waits that say what they wait for: a wait past [`SLOW_WAIT`] gets a line in the log,
//! so a client or server that is slow explains itself.

use std::time::Duration;

/// A client's wait that lasts this long gets a line in the log saying what it waits
/// for (on a healthy swarm every wait is well under it)...
pub const SLOW_WAIT: Duration = Duration::from_secs(3);
/// ... and another every this long while it goes on.
pub const SLOW_WAIT_REPEAT: Duration = Duration::from_secs(10);

/// Awaits `fut`; if that takes longer than [`SLOW_WAIT`], warns what it is waiting for
/// (`what` says it), and again every [`SLOW_WAIT_REPEAT`]: a client that is slow says
/// why, so the next slowness explains itself.
pub async fn noting_wait<F: std::future::Future>(what: impl Fn() -> String, fut: F) -> F::Output {
    let started = tokio::time::Instant::now();
    let mut note_at = started + SLOW_WAIT;
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = tokio::time::sleep_until(note_at) => {
                tracing::warn!("waiting {:.0?} so far for {}", started.elapsed(), what());
                note_at += SLOW_WAIT_REPEAT;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::{noting_wait, SLOW_WAIT};

    /// Collects what the log says.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Log {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into()
        }
    }

    /// A wait past [`SLOW_WAIT`] is logged with what it waits for; a quick one is not.
    #[tokio::test]
    async fn a_slow_wait_says_what_it_waits_for() {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::WARN)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let quick = noting_wait(|| "the quick one".into(), async { 7 }).await;
        assert_eq!(quick, 7);
        let slow = tokio::time::sleep(SLOW_WAIT + Duration::from_millis(300));
        noting_wait(|| "server X to answer".into(), slow).await;

        let text = log.text();
        assert!(!text.contains("the quick one"), "{text}");
        assert_eq!(
            text.matches("so far for server X to answer").count(),
            1,
            "{text}"
        );
    }
}
