//! Prometheus metrics of servers (`shoal serve --metrics ADDR`) and of the gateway
//! (`shoal api`, at `/metrics`), in the OpenMetrics text format.
//!
//! Every metric is a handle onto shared atomics: the compute thread and the request
//! handlers update their own clones, and a scrape reads them. Metrics are always
//! counted (a handful of atomic adds per step); only the endpoint is optional.

use std::sync::Arc;
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The content type of an OpenMetrics text exposition.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels naming why something failed, e.g. `[("kind", "unknown_session")]`.
pub type KindLabel = [(&'static str, &'static str); 1];

/// Buckets from 0.25 ms to about 8 s, doubling: one token's step on a small span takes
/// well under a millisecond, a long prefill over a big span seconds.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// What a server counts.
#[derive(Clone)]
pub struct ServerMetrics {
    /// Steps computed (one per session per step, batched or not).
    pub steps: Counter,
    /// Token positions computed over this server's span.
    pub tokens: Counter,
    /// Seconds from a step's arrival at the compute thread to its output being ready.
    pub step_seconds: Histogram,
    /// Sessions in a computed batch.
    pub batch_sessions: Histogram,
    /// Sessions open now.
    pub sessions: Gauge,
    /// Tokens held in the KV caches of open sessions.
    pub cache_tokens_used: Gauge,
    /// Tokens reserved by open sessions (each reserves its longest sequence).
    pub cache_tokens_reserved: Gauge,
    /// The most tokens sessions may reserve together (`--max-cache-tokens`).
    pub cache_tokens_limit: Gauge,
    /// Sessions refused (busy, too long, wrong span...), by why.
    pub refused_sessions: Family<KindLabel, Counter>,
    /// Steps that failed or were refused, by why.
    pub failures: Family<KindLabel, Counter>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self {
            steps: Counter::default(),
            tokens: Counter::default(),
            step_seconds: latency_histogram(),
            batch_sessions: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            sessions: Gauge::default(),
            cache_tokens_used: Gauge::default(),
            cache_tokens_reserved: Gauge::default(),
            cache_tokens_limit: Gauge::default(),
            refused_sessions: Family::default(),
            failures: Family::default(),
        }
    }
}

impl ServerMetrics {
    /// Adds these metrics to `registry` (names get the registry's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("steps_served", "Steps computed", self.steps.clone());
        registry.register(
            "tokens_processed",
            "Token positions computed over this server's blocks",
            self.tokens.clone(),
        );
        registry.register(
            "step_latency_seconds",
            "Seconds from a step reaching the compute thread to its output",
            self.step_seconds.clone(),
        );
        registry.register(
            "batch_sessions",
            "Sessions computed together in one batch",
            self.batch_sessions.clone(),
        );
        registry.register("sessions_open", "Sessions open", self.sessions.clone());
        registry.register(
            "cache_tokens_used",
            "Tokens held in the KV caches of open sessions",
            self.cache_tokens_used.clone(),
        );
        registry.register(
            "cache_tokens_reserved",
            "KV-cache tokens reserved by open sessions",
            self.cache_tokens_reserved.clone(),
        );
        registry.register(
            "cache_tokens_limit",
            "KV-cache tokens all sessions may reserve together",
            self.cache_tokens_limit.clone(),
        );
        registry.register(
            "sessions_refused",
            "Sessions refused, by why",
            self.refused_sessions.clone(),
        );
        registry.register(
            "step_failures",
            "Steps refused or failed, by why",
            self.failures.clone(),
        );
    }
}

/// What the gateway counts.
#[derive(Clone)]
pub struct GatewayMetrics {
    /// Requests answered, by endpoint and outcome.
    pub requests: Family<[(&'static str, &'static str); 2], Counter>,
    /// Completion tokens generated.
    pub tokens_generated: Counter,
    /// Prompt tokens read.
    pub prompt_tokens: Counter,
    /// Seconds of one step through the chain (or the local blocks), as the client sees
    /// it: a decode token or a prefill chunk.
    pub step_seconds: Histogram,
    /// Generations running now (each holds one session on every server of its chain).
    pub sessions: Gauge,
    /// Failovers: a server of a chain failed and the session moved to another.
    pub reroutes: Counter,
    /// Generations that failed, by why.
    pub failures: Family<KindLabel, Counter>,
    /// Requests waiting for a turn to generate (`shoal api --max-running`).
    pub queued: Gauge,
    /// Seconds from a request's arrival to its first token: the wait for a turn, the
    /// prompt through the chain and the first token's choice.
    pub first_token_seconds: Histogram,
    /// Prompt tokens not sent through the chain again: a conversation's earlier turns,
    /// held by a session kept open on its servers.
    pub prompt_tokens_cached: Counter,
    /// Conversations whose session is kept open between turns.
    pub conversations_kept: Gauge,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            tokens_generated: Counter::default(),
            prompt_tokens: Counter::default(),
            step_seconds: latency_histogram(),
            sessions: Gauge::default(),
            reroutes: Counter::default(),
            failures: Family::default(),
            queued: Gauge::default(),
            first_token_seconds: latency_histogram(),
            prompt_tokens_cached: Counter::default(),
            conversations_kept: Gauge::default(),
        }
    }
}

impl GatewayMetrics {
    /// Adds these metrics to `registry` (names get the registry's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "requests",
            "Requests answered, by endpoint and outcome",
            self.requests.clone(),
        );
        registry.register(
            "tokens_generated",
            "Completion tokens generated",
            self.tokens_generated.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens read",
            self.prompt_tokens.clone(),
        );
        registry.register(
            "step_latency_seconds",
            "Seconds of one step through the chain as the client sees it",
            self.step_seconds.clone(),
        );
        registry.register(
            "sessions_open",
            "Generations running (one session per server of the chain)",
            self.sessions.clone(),
        );
        registry.register(
            "reroutes",
            "Failovers to another server mid-generation",
            self.reroutes.clone(),
        );
        registry.register(
            "generation_failures",
            "Generations that failed, by why",
            self.failures.clone(),
        );
        registry.register(
            "queued_requests",
            "Requests waiting for a turn to generate",
            self.queued.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Seconds from a request's arrival to its first token",
            self.first_token_seconds.clone(),
        );
        registry.register(
            "prompt_tokens_cached",
            "Prompt tokens held from a conversation's earlier turns, not sent again",
            self.prompt_tokens_cached.clone(),
        );
        registry.register(
            "conversations_kept",
            "Conversations whose session is kept open between turns",
            self.conversations_kept.clone(),
        );
    }

    /// Records one step's round trip.
    pub fn step(&self, took: Duration) {
        self.step_seconds.observe(took.as_secs_f64());
    }
}

/// A registry whose metric names start with `shoal_`.
pub fn registry() -> Registry {
    Registry::with_prefix("shoal")
}

/// The OpenMetrics text of `registry`.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    encode(&mut out, registry)?;
    Ok(out)
}

/// The `/metrics` response for `registry`.
pub async fn scrape(registry: Arc<Registry>) -> axum::response::Response {
    match render(&registry) {
        Ok(text) => ([(CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics",
        )
            .into_response(),
    }
}

/// A router serving `/metrics` alone (for `shoal serve --metrics`).
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new().route("/metrics", get(move || scrape(registry.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_types_and_values_reach_the_text() {
        let m = ServerMetrics::default();
        let mut r = registry();
        m.register(&mut r);
        m.steps.inc_by(3);
        m.sessions.set(2);
        m.step_seconds.observe(0.001);
        m.failures.get_or_create(&[("kind", "busy")]).inc();
        let text = render(&r).expect("encode");
        assert!(text.contains("# TYPE shoal_steps_served counter"), "{text}");
        assert!(text.contains("shoal_steps_served_total 3"), "{text}");
        assert!(text.contains("shoal_sessions_open 2"), "{text}");
        assert!(
            text.contains("shoal_step_latency_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("shoal_step_failures_total{kind=\"busy\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
