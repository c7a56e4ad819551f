//! The daemon's probes and metrics address, and what `GET /cutover` serves there: the ownership
//! records read on every request, the feeds (lags, reverse tails) read every few seconds, and
//! the gauges the `FicusCannotRollBack` alert watches. An application that names itself
//! (`?instance=ID`) is recorded as having seen the epochs served (see `cutover::views`: a fence
//! holds once the applications seen have acknowledged it).
//!
//! `GET /log` serves the migration log (`cutover::log`); what the commands write there since
//! the process started (a rollout's analyses, its rollbacks) becomes metrics here, since a
//! command is gone before Prometheus could scrape it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{DaemonError, Definitions};
use crate::clients::Clients;
use crate::config::Config;
use crate::cutover::log::{Entry, Kind, MigrationLog};
use crate::cutover::views::{Viewer, Views};
use crate::ops::Health;
use crate::status::{CutoverFeeds, CutoverRecords};
use crate::transform::ServiceTransforms;

/// How often the feeds behind `GET /cutover` and the cutover gauges are read again; the
/// ownership records themselves are read on every request.
const CUTOVER_EVERY: Duration = Duration::from_secs(5);

/// Installs the metrics recorder and serves `/metrics`, `/healthz`, `/readyz` and `/cutover`
/// on `addr` until shutdown.
pub(super) async fn serve(
    addr: SocketAddr,
    config: &Config,
    definitions: &Definitions,
    clients: &Clients,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    let handle = crate::ops::install_metrics().map_err(|e| DaemonError::Metrics(e.to_string()))?;
    let (tx, feeds) = watch::channel(None);
    let services = definitions.services.clone();
    tokio::spawn(watch_feeds(config.clone(), services.clone(), clients.clone(), tx, shutdown.clone()));
    tokio::spawn(follow_log(MigrationLog::new(&clients.store()), shutdown.clone()));
    let routes = vec![("/cutover", handler(services, clients.store(), feeds)), ("/log", log_handler(clients.store()))];
    let bound = crate::ops::serve(addr, handle, health.clone(), routes, shutdown.clone())
        .await
        .map_err(|source| DaemonError::Serve { addr, source })?;
    info!(addr = %bound, "serving /metrics, /healthz, /readyz, /cutover and /log");
    Ok(())
}

/// Reads every cutover service's feeds every [`CUTOVER_EVERY`], and sets the gauges.
async fn watch_feeds(
    cfg: Config,
    services: Vec<Arc<ServiceTransforms>>,
    clients: Clients,
    tx: watch::Sender<Option<CutoverFeeds>>,
    shutdown: CancellationToken,
) {
    loop {
        let read = async {
            let records = CutoverRecords::read(&clients.store()).await?;
            let feeds = crate::status::cutover_feeds(&cfg, &clients, &services, &records).await?;
            anyhow::Ok((records, feeds))
        };
        match read.await {
            Ok((records, feeds)) => {
                for s in records.states(&services, &feeds) {
                    let service = s.service.clone();
                    metrics::gauge!("ficus_cutover_can_rollback", "service" => service.clone())
                        .set(if s.can_rollback { 1.0 } else { 0.0 });
                    let fenced = s.fenced.map_or(0, |f| f.to.saturating_sub(f.from));
                    metrics::gauge!("ficus_cutover_fenced_buckets", "service" => service).set(f64::from(fenced));
                }
                tx.send_replace(Some(feeds));
            }
            Err(e) => warn!("reading the cutover state: {e:#}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CUTOVER_EVERY) => {}
        }
    }
}

/// `GET /log?service=S&limit=N`: the migration log's last entries (100 by default, at most
/// 1,000), oldest first.
fn log_handler(store: mongodb::Database) -> crate::ops::JsonHandler {
    let log = MigrationLog::new(&store);
    Arc::new(move |query| {
        let log = log.clone();
        Box::pin(async move {
            let service = crate::ops::query_param(query.as_deref(), "service");
            let limit = crate::ops::query_param(query.as_deref(), "limit").and_then(|l| l.parse::<i64>().ok());
            match log.read(service.as_deref(), limit.unwrap_or(100).clamp(1, 1000)).await {
                Ok(entries) => {
                    let entries: Vec<serde_json::Value> = entries.iter().map(Entry::to_json).collect();
                    Some(serde_json::json!({ "entries": entries }).to_string())
                }
                Err(e) => {
                    warn!("reading the migration log for GET /log: {}", crate::mongo::describe(&e));
                    None
                }
            }
        })
    })
}

/// Turns what the commands write into the migration log from now on into metrics:
/// `ficus_cutover_analysis_value{service,metric}` and `ficus_cutover_analysis_total{service,
/// metric,result}` per analysis, `ficus_cutover_rollbacks_total{service}` and
/// `ficus_cutover_rollback_seconds{service}` per automatic rollback.
async fn follow_log(log: MigrationLog, shutdown: CancellationToken) {
    let mut seen = bson::DateTime::now();
    loop {
        match log.since(seen).await {
            Ok(entries) => {
                for e in &entries {
                    count(e);
                }
                seen = entries.last().map_or(seen, |e| e.at);
            }
            Err(e) => warn!("reading the migration log: {}", crate::mongo::describe(&e)),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CUTOVER_EVERY) => {}
        }
    }
}

/// The metrics of one migration log entry.
fn count(e: &Entry) {
    let service = e.service.clone();
    match e.kind {
        Kind::Analysis => {
            for r in &e.readings {
                let (s, m) = (service.clone(), r.metric.clone());
                if let Some(v) = r.value {
                    metrics::gauge!("ficus_cutover_analysis_value", "service" => s.clone(), "metric" => m.clone())
                        .set(v);
                }
                metrics::counter!("ficus_cutover_analysis_total", "service" => s, "metric" => m, "result" => r.result.clone())
                    .increment(1);
            }
        }
        Kind::RolledBack => {
            metrics::counter!("ficus_cutover_rollbacks_total", "service" => service.clone()).increment(1);
            if let Some(t) = e.took_secs {
                metrics::gauge!("ficus_cutover_rollback_seconds", "service" => service).set(t);
            }
        }
        _ => {}
    }
}

/// `GET /cutover`: the ownership records read now, with the feeds as last read.
fn handler(
    services: Vec<Arc<ServiceTransforms>>,
    store: mongodb::Database,
    feeds: watch::Receiver<Option<CutoverFeeds>>,
) -> crate::ops::JsonHandler {
    Arc::new(move |query| {
        let instance = crate::ops::query_param(query.as_deref(), "instance");
        let (services, store, feeds) = (services.clone(), store.clone(), feeds.borrow().clone());
        Box::pin(async move {
            let feeds = feeds?;
            let records = match CutoverRecords::read(&store).await {
                Ok(r) => r,
                Err(e) => {
                    warn!("reading the ownership records for GET /cutover: {e:#}");
                    return None;
                }
            };
            let states = records.states(&services, &feeds);
            if let Some(instance) = instance {
                let epochs: Vec<(String, i64)> = states.iter().map(|s| (s.service.clone(), s.epoch)).collect();
                if let Err(e) = Views::new(&store).saw(Viewer::App, &instance, &epochs).await {
                    warn!(%instance, "recording what an application saw: {e}");
                }
            }
            Some(serde_json::json!({ "services": states }).to_string())
        })
    })
}
