//! Bounded waiting for a condition that becomes true eventually (replication,
//! discovery, catch-up).

use std::time::{Duration, Instant};

/// Polls `condition` every `poll_interval` until it returns true; panics when it is
/// still false after `timeout`, naming `what` was awaited and how often it was checked.
///
/// Every attempt is itself cut off at the remaining time, so a condition that hangs
/// (a request to a stuck node) cannot stretch the wait past `timeout`.
pub async fn wait_until<F>(what: &str, timeout: Duration, poll_interval: Duration, mut condition: F)
where
    F: AsyncFnMut() -> bool,
{
    let started = Instant::now();
    let deadline = started + timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, condition()).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => break,
        }
        if Instant::now() + poll_interval >= deadline {
            break;
        }
        tokio::time::sleep(poll_interval).await;
    }
    panic!(
        "timed out after {:.1?} waiting until {what} ({attempts} checks, every {poll_interval:?})",
        started.elapsed()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let mut calls = 0;
        wait_until(
            "the third call",
            Duration::from_secs(5),
            Duration::from_millis(1),
            async || {
                calls += 1;
                calls == 3
            },
        )
        .await;
        assert_eq!(calls, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting until never")]
    async fn panics_with_the_description_after_the_timeout() {
        wait_until(
            "never",
            Duration::from_millis(50),
            Duration::from_millis(10),
            async || false,
        )
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "waiting until a hung check")]
    async fn a_hanging_check_is_cut_off_at_the_timeout() {
        wait_until(
            "a hung check",
            Duration::from_millis(50),
            Duration::from_millis(10),
            async || {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                true
            },
        )
        .await;
    }
}
