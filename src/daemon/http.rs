//! The HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (the process and its work
//! loop are alive) and `/readyz` (configuration loaded, local etcd member and store reachable;
//! a JSON body says why not).

use crate::daemon::metrics::Metrics;
use crate::systemd::Heartbeat;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Reachability as last observed by the refresh loop.
#[derive(Debug, Default, Clone)]
pub struct Readiness {
    /// `None` when etcd answered; otherwise why not.
    pub etcd: Option<String>,
    /// `None` when the store answered; otherwise why not.
    pub store: Option<String>,
    /// Whether a refresh has completed at all.
    pub checked: bool,
}

/// Shared state of the endpoints.
#[derive(Clone)]
pub struct HttpState {
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The work loop's heartbeat.
    pub heartbeat: Heartbeat,
    /// Last observed reachability.
    pub readiness: Arc<Mutex<Readiness>>,
    /// `/healthz` fails when the loop has not beaten for this long.
    pub stall_after: Duration,
}

/// Serves OpenMetrics to scrapers that ask for it (Prometheus does), the Prometheus text
/// format otherwise.
async fn metrics(State(s): State<HttpState>, headers: HeaderMap) -> impl IntoResponse {
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    let text = s.metrics.encode(now);
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::daemon::metrics::to_prometheus_text(&text),
        )
    }
}

async fn healthz(State(s): State<HttpState>) -> impl IntoResponse {
    let since = s.heartbeat.since_last();
    if since < s.stall_after {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the work loop has not made progress for {}s\n",
                since.as_secs()
            ),
        )
    }
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    let r = s.readiness.lock().map(|r| r.clone()).unwrap_or_default();
    let ready = r.checked && r.etcd.is_none() && r.store.is_none();
    let body = serde_json::json!({
        "ready": ready,
        "config": "loaded",
        "etcd": r.etcd.clone().unwrap_or_else(|| if r.checked { "ok".into() } else { "not checked yet".into() }),
        "store": r.store.clone().unwrap_or_else(|| if r.checked { "ok".into() } else { "not checked yet".into() }),
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// The router (also used by tests).
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Binds `addr`.
///
/// # Errors
/// A message naming the address when it cannot be bound.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        format!("cannot listen on {addr} for /metrics: {e}; change [metrics] listen or stop what uses the port")
    })
}

/// Serves until `cancel`.
pub async fn serve(listener: tokio::net::TcpListener, state: HttpState, cancel: CancellationToken) {
    let app = router(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "the metrics server failed");
    }
}
