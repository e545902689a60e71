//! The daemons' small HTTP side: `GET /metrics` in the Prometheus text format (SPEC §12),
//! served with axum on an address of the operator's choosing.

use std::net::SocketAddr;
use std::sync::Arc;

/// The content type of the Prometheus text format (OpenMetrics, as prometheus-client writes it).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` and serves `GET /metrics` with what `render` returns at each scrape, until
/// the returned task is aborted. Returns the bound address (for a port 0) and the task.
pub async fn serve_metrics(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                let body = tokio::task::spawn_blocking(move || render()).await.unwrap_or_default();
                ([(axum::http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body)
            }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "/metrics stopped being served.");
        }
    });
    Ok((bound, task))
}
