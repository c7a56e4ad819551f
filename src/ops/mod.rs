//! What operators see of a running daemon, and what keeps a deployment sane: `/metrics`,
//! `/healthz`, `/readyz` on one address, the roles' health, and the registry of consumer-group
//! members ([`presence`]).
//!
//! Roles report liveness through a shared [`Health`]: each beats while it makes progress (or is
//! waiting for work it could do), and says whether it is connected. `/healthz` answers while
//! the process runs; `/readyz` answers 200 only while every role is connected and has beaten
//! within the stall timeout, and 503 naming the stalled roles otherwise. The registry is passed
//! to the roles that report to it, like the shutdown token; nothing here is global but the
//! metrics recorder itself, which the `metrics` facade requires.

pub mod membership;
pub mod presence;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// A role of a running process, as health and metrics name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RoleId {
    /// The source's tailer (active or on standby).
    Tail,
    /// One service's consumer.
    Consume(String),
    /// The archive.
    Archive,
    /// A service database's tailer (reverse sync), while the service owns any of its keys.
    ReverseTail(String),
    /// A service's write-back consumer (reverse sync into the monolith).
    WriteBack(String),
}

impl fmt::Display for RoleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoleId::Tail => f.write_str("tail"),
            RoleId::Consume(service) => write!(f, "consume:{service}"),
            RoleId::Archive => f.write_str("archive"),
            RoleId::ReverseTail(service) => write!(f, "reverse-tail:{service}"),
            RoleId::WriteBack(service) => write!(f, "write-back:{service}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Beat {
    at: Instant,
    connected: bool,
    /// Why the role cannot make progress although it is connected and alive (a consumer group
    /// that holds nothing while messages wait), as its own watcher last judged.
    stalled: Option<String>,
}

/// Liveness of the roles in this process.
#[derive(Clone)]
pub struct Health {
    roles: Arc<Mutex<BTreeMap<String, Beat>>>,
    stall_after: Duration,
}

impl Health {
    pub fn new(stall_after: Duration) -> Self {
        Health { roles: Arc::default(), stall_after }
    }

    /// A role made progress (or is idle but able to work) and is connected.
    pub fn beat(&self, role: &RoleId) {
        self.set(role, true);
    }

    /// A role lost its connection (it is retrying).
    pub fn disconnected(&self, role: &RoleId) {
        self.set(role, false);
    }

    /// A role stopped on purpose (reverse sync for a service back at 0%): no longer watched.
    pub fn forget(&self, role: &RoleId) {
        self.roles.lock().unwrap_or_else(|p| p.into_inner()).remove(&role.to_string());
        metrics::gauge!("ficus_role_ready", "role" => role.to_string()).set(1.0);
    }

    /// A role's watcher judged it stalled (`Some(why)`) or not (`None`).
    pub fn set_stalled(&self, role: &RoleId, why: Option<String>) {
        let mut roles = self.roles.lock().unwrap_or_else(|p| p.into_inner());
        let beat = roles.entry(role.to_string()).or_insert(Beat { at: Instant::now(), connected: true, stalled: None });
        beat.stalled = why;
        let ready = beat.connected && beat.stalled.is_none();
        metrics::gauge!("ficus_role_ready", "role" => role.to_string()).set(if ready { 1.0 } else { 0.0 });
    }

    fn set(&self, role: &RoleId, connected: bool) {
        let mut roles = self.roles.lock().unwrap_or_else(|p| p.into_inner());
        let beat = roles.entry(role.to_string()).or_insert(Beat { at: Instant::now(), connected, stalled: None });
        beat.at = Instant::now();
        beat.connected = connected;
        let ready = connected && beat.stalled.is_none();
        metrics::gauge!("ficus_role_ready", "role" => role.to_string()).set(if ready { 1.0 } else { 0.0 });
    }

    /// Roles that are not ready, with why; empty when all are.
    pub fn problems(&self) -> Vec<String> {
        let roles = self.roles.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (role, beat) in roles.iter() {
            if !beat.connected {
                out.push(format!("{role}: disconnected, retrying"));
            } else if let Some(why) = &beat.stalled {
                out.push(format!("{role}: {why}"));
            } else if beat.at.elapsed() > self.stall_after {
                out.push(format!("{role}: no progress for {}s", beat.at.elapsed().as_secs()));
            }
        }
        if roles.is_empty() {
            out.push("no role has started yet".into());
        }
        out
    }
}

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install_metrics() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
    PrometheusBuilder::new()
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()), &buckets)?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("ficus_consume_batch_size".into()),
            &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0],
        )?
        .install_recorder()
}

/// Answers a JSON route (`GET /cutover`, `GET /log`): given the request's query string, the
/// answer as JSON, or `None` while there is nothing to answer yet (503).
pub type JsonHandler =
    std::sync::Arc<dyn Fn(Option<String>) -> futures::future::BoxFuture<'static, Option<String>> + Send + Sync>;

/// A parameter of a query string (`instance=ID`), if it is there and not empty.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    let query = query?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

/// Serves `/metrics`, `/healthz`, `/readyz` and the JSON `routes` (path, handler) until
/// shutdown. Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    health: Health,
    routes: Vec<(&'static str, JsonHandler)>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(|State((m, _)): State<(PrometheusHandle, Health)>| async move { m.render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State((_, h)): State<(PrometheusHandle, Health)>| async move {
                let problems = h.problems();
                if problems.is_empty() {
                    (StatusCode::OK, "ready\n".to_string())
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, format!("not ready:\n{}\n", problems.join("\n")))
                }
            }),
        )
        .with_state((metrics.clone(), health));
    let app = routes.into_iter().fold(app, |app, (path, handler)| {
        app.route(
            path,
            get(move |axum::extract::RawQuery(q): axum::extract::RawQuery| {
                let answer = handler(q);
                async move {
                    match answer.await {
                        Some(j) => (StatusCode::OK, [(axum::http::header::CONTENT_TYPE, "application/json")], j),
                        None => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            [(axum::http::header::CONTENT_TYPE, "text/plain")],
                            format!("{path}: nothing has been read yet\n"),
                        ),
                    }
                }
            }),
        )
    });
    // The handle's upkeep (histogram buckets) and the HTTP server both stop with the process.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            metrics.run_upkeep();
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
    });
    Ok(bound)
}

/// Seconds from a cluster time to now (negative clocks clamp to 0).
pub fn age_seconds(cluster_time_secs: u32) -> f64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    (now - f64::from(cluster_time_secs)).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_application_names_itself_in_the_query() {
        let instance_of = |q: Option<&str>| query_param(q, "instance");
        assert_eq!(instance_of(Some("instance=checkout-7")), Some("checkout-7".into()));
        assert_eq!(instance_of(Some("x=1&instance=a%2Fb")), Some("a/b".into()));
        assert_eq!(instance_of(Some("instance=")), None);
        assert_eq!(instance_of(Some("other=1")), None);
        assert_eq!(instance_of(None), None);
    }

    #[test]
    fn a_role_that_stops_beating_is_not_ready() {
        let h = Health::new(Duration::from_millis(50));
        assert_eq!(h.problems(), ["no role has started yet"]);
        h.beat(&RoleId::Tail);
        assert!(h.problems().is_empty());
        let customers = RoleId::Consume("customers_db".into());
        h.disconnected(&customers);
        assert_eq!(h.problems(), ["consume:customers_db: disconnected, retrying"]);
        h.beat(&customers);
        std::thread::sleep(Duration::from_millis(80));
        let p = h.problems();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("no progress"));
    }

    #[test]
    fn a_stalled_group_is_not_ready_however_often_it_beats() {
        let h = Health::new(Duration::from_secs(60));
        let customers = RoleId::Consume("customers_db".into());
        h.beat(&customers);
        h.set_stalled(&customers, Some("no partitions assigned, lag 12".into()));
        h.beat(&customers);
        assert_eq!(h.problems(), ["consume:customers_db: no partitions assigned, lag 12"]);
        h.set_stalled(&customers, None);
        assert!(h.problems().is_empty());
    }
}
