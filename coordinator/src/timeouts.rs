//! When a client presumes a chain broken: how long a step may take before it probes the
//! servers, and how long a probe waits. The node's client and the simulator's clients
//! time out by these same functions.

use std::time::Duration;

/// The longest a step may take (the first prefill of a long prompt on a slow machine
/// can take many seconds).
pub const FIRST_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// A step is declared lost when it takes this many times the recent decode step...
pub const TIMEOUT_FACTOR: f64 = 8.0;
/// ... but never sooner than this: scheduling hiccups on a loaded machine are not deaths.
pub const MIN_STEP_TIMEOUT: Duration = Duration::from_millis(400);

/// Wait for a server suspected dead to answer a liveness probe. Short, since it decides
/// how soon a failover starts; a live but starved server that misses it costs a
/// failover, never a wrong output.
pub const DEATH_PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// How long a step of `tokens` tokens may take before the chain is presumed broken,
/// given the recent one-token step (`recent_step`, if any) and the chain's predicted
/// seconds per token from its servers' announced speeds (`per_token`): a multiple of the
/// recent step, plus, for many tokens, a multiple of the prediction (a prefill is faster
/// per token than decoding, so this errs long). Between [`MIN_STEP_TIMEOUT`] and
/// [`FIRST_STEP_TIMEOUT`].
pub fn step_timeout(recent_step: Option<f64>, per_token: f64, tokens: u32) -> Duration {
    let one = recent_step.map(|s| s * TIMEOUT_FACTOR);
    let secs = match (one, tokens) {
        (Some(one), 1) => one,
        (one, n) if per_token.is_finite() => one.unwrap_or(0.0) + 4.0 * per_token * n as f64,
        _ => return FIRST_STEP_TIMEOUT,
    };
    Duration::from_secs_f64(secs.min(FIRST_STEP_TIMEOUT.as_secs_f64())).max(MIN_STEP_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_time_out_after_a_multiple_of_the_recent_one_within_bounds() {
        assert_eq!(
            step_timeout(Some(0.1), 0.1, 1),
            Duration::from_secs_f64(0.8)
        );
        assert_eq!(step_timeout(Some(0.01), 0.01, 1), MIN_STEP_TIMEOUT);
        assert_eq!(step_timeout(None, f64::INFINITY, 1), FIRST_STEP_TIMEOUT);
        assert_eq!(step_timeout(Some(100.0), 0.1, 1), FIRST_STEP_TIMEOUT);
        // A prefill of 100 tokens: the recent step's allowance plus 4x the prediction.
        assert_eq!(
            step_timeout(Some(0.1), 0.01, 100),
            Duration::from_secs_f64(4.8)
        );
    }
}
