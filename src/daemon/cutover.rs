//! The daemon's probes and metrics address, and what `GET /cutover` serves there: the ownership
//! records read on every request, the feeds (lags, reverse tails) read every few seconds, and
//! the gauges the `FicusCannotRollBack` alert watches. An application that names itself
//! (`?instance=ID`) is recorded as having seen the epochs served (see `cutover::views`: a fence
//! holds once the applications seen have acknowledged it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{DaemonError, Definitions};
use crate::clients::Clients;
use crate::config::Config;
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
    let cutover = handler(services, clients.store(), feeds);
    let bound = crate::ops::serve(addr, handle, health.clone(), cutover, shutdown.clone())
        .await
        .map_err(|source| DaemonError::Serve { addr, source })?;
    info!(addr = %bound, "serving /metrics, /healthz, /readyz and /cutover");
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

/// `GET /cutover`: the ownership records read now, with the feeds as last read.
fn handler(
    services: Vec<Arc<ServiceTransforms>>,
    store: mongodb::Database,
    feeds: watch::Receiver<Option<CutoverFeeds>>,
) -> crate::ops::CutoverHandler {
    Arc::new(move |instance| {
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
