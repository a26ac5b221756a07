//! When an attempt is retried: Istio's (Envoy's) `retryOn` conditions over
//! what the attempt gave, and a retry budget so retries cannot multiply the
//! load on a failing service (Envoy's and Linkerd's idea: retries may add a
//! share of the requests, plus a small floor per second). Pure, and the
//! budget's clock is tokio's, so tests run it on paused time.
use std::sync::Mutex;

use mesh_common::api;
use tokio::time::Instant;

/// What one attempt gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response: its status and, for gRPC, the `grpc-status` of its headers.
    Response { status: u16, grpc: Option<u32> },
    /// No connection to the endpoint.
    ConnectFailure,
    /// The connection failed after the request was sent (reset, closed).
    Reset,
    /// The endpoint refused the HTTP/2 stream.
    RefusedStream,
    /// The per-try timeout passed without response headers.
    PerTryTimeout,
    /// The cluster's circuit breaker refused it (no connection to be had
    /// within `http1MaxPendingRequests`): never retried.
    Overflow,
}

/// Whether `policy` retries `outcome`.
pub fn retriable(policy: &api::Retry, outcome: Outcome) -> bool {
    let on = |name: &str| policy.retry_on.iter().any(|c| c == name);
    match outcome {
        Outcome::ConnectFailure => on("connect-failure") || on("5xx") || on("gateway-error") || on("reset"),
        Outcome::Reset => on("reset") || on("5xx"),
        Outcome::RefusedStream => on("refused-stream") || on("reset") || on("5xx"),
        Outcome::PerTryTimeout => on("5xx") || on("gateway-error") || on("reset"),
        Outcome::Overflow => false,
        Outcome::Response { status, grpc } => {
            let by_status = (on("5xx") && status >= 500)
                || (on("gateway-error") && (502..=504).contains(&status))
                || (on("retriable-4xx") && status == 409)
                || (on("retriable-status-codes") && policy.status_codes.contains(&u32::from(status)));
            let by_grpc = grpc.is_some_and(|g| {
                (on("cancelled") && g == 1)
                    || (on("deadline-exceeded") && g == 4)
                    || (on("resource-exhausted") && g == 8)
                    || (on("internal") && g == 13)
                    || (on("unavailable") && g == 14)
            });
            by_status || by_grpc
        }
    }
}

// Tokens are counted in thousandths of a retry, so shares add up exactly.
const RETRY: u64 = 1000;
/// Retries may add this share of the requests (20 %)...
const PER_REQUEST: u64 = 200;
/// ...plus this many per second (10), so a quiet service can still retry...
const PER_SECOND: u64 = 10 * RETRY;
/// ...saved up to this many (100).
const MAX_SAVED: u64 = 100 * RETRY;

/// A token bucket: each request deposits a fifth of a retry, time deposits
/// ten a second, each retry withdraws one.
pub struct Budget {
    state: Mutex<(u64, Instant)>,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget { state: Mutex::new((PER_SECOND, Instant::now())) }
    }
}

impl Budget {
    fn with<T>(&self, f: impl FnOnce(&mut u64) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let earned = now.duration_since(s.1).as_millis() as u64 * PER_SECOND / 1000;
        if earned > 0 {
            s.0 = (s.0 + earned).min(MAX_SAVED);
            s.1 = now;
        }
        f(&mut s.0)
    }

    /// A request arrived.
    pub fn deposit(&self) {
        self.with(|t| *t = (*t + PER_REQUEST).min(MAX_SAVED));
    }

    /// Whether one more retry may be sent now (and, if so, it is counted).
    pub fn withdraw(&self) -> bool {
        self.with(|t| {
            if *t >= RETRY {
                *t -= RETRY;
                true
            } else {
                false
            }
        })
    }
}

/// The pause before retry `n` (1-based): the policy's backoff, else Envoy's
/// 25 ms base, doubled per retry, with full jitter, at most 250 ms.
pub fn backoff(policy: &api::Retry, n: u32, roll: f64) -> std::time::Duration {
    let base = if policy.backoff_ms > 0 { policy.backoff_ms as f64 } else { 25.0 };
    let ceiling = (base * 2f64.powi(n.saturating_sub(1) as i32)).min(base * 10.0);
    std::time::Duration::from_secs_f64(ceiling * roll / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &[&str], codes: &[u32]) -> api::Retry {
        api::Retry {
            attempts: 2,
            retry_on: on.iter().map(|s| s.to_string()).collect(),
            status_codes: codes.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn retry_on_conditions() {
        let r = |status| Outcome::Response { status, grpc: None };
        let g = |code| Outcome::Response { status: 200, grpc: Some(code) };
        let default = mesh_common::routing::default_retry();
        let cases: Vec<(api::Retry, Outcome, bool)> = vec![
            (default.clone(), Outcome::ConnectFailure, true),
            (default.clone(), r(503), true),
            (default.clone(), r(500), false),
            (default.clone(), g(14), true),
            (default.clone(), g(1), true),
            (default.clone(), g(4), false),
            (default.clone(), Outcome::Reset, false),
            (default.clone(), Outcome::RefusedStream, true),
            (policy(&["5xx"], &[]), r(500), true),
            (policy(&["5xx"], &[]), r(404), false),
            (policy(&["5xx"], &[]), Outcome::Reset, true),
            (policy(&["5xx"], &[]), Outcome::PerTryTimeout, true),
            (policy(&["gateway-error"], &[]), r(502), true),
            (policy(&["gateway-error"], &[]), r(500), false),
            (policy(&["retriable-4xx"], &[]), r(409), true),
            (policy(&["retriable-status-codes"], &[418]), r(418), true),
            (policy(&["retriable-status-codes"], &[418]), r(503), false),
            (policy(&["reset"], &[]), Outcome::Reset, true),
            (policy(&["deadline-exceeded"], &[]), g(4), true),
            (policy(&["resource-exhausted"], &[]), g(8), true),
            (policy(&[], &[]), Outcome::ConnectFailure, false),
        ];
        for (p, outcome, want) in cases {
            assert_eq!(retriable(&p, outcome), want, "{:?} {outcome:?}", p.retry_on);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_lets_retries_add_a_share_plus_a_floor() {
        let b = Budget::default();
        // The initial floor: ten retries, then none without new requests or time.
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10);
        // 100 requests buy 20 retries.
        (0..100).for_each(|_| b.deposit());
        assert_eq!((0..50).filter(|_| b.withdraw()).count(), 20);
        // A second adds ten more.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert_eq!((0..50).filter(|_| b.withdraw()).count(), 10);
        // Savings are capped.
        tokio::time::advance(std::time::Duration::from_secs(3600)).await;
        assert_eq!((0..500).filter(|_| b.withdraw()).count(), 100);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_a_ceiling() {
        let p = policy(&[], &[]);
        assert_eq!(backoff(&p, 1, 1.0).as_millis(), 25);
        assert_eq!(backoff(&p, 2, 1.0).as_millis(), 50);
        assert_eq!(backoff(&p, 9, 1.0).as_millis(), 250);
        assert_eq!(backoff(&p, 2, 0.5).as_millis(), 25);
    }
}
