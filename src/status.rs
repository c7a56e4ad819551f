//! `ficus status`: every stage's position, lag and health in one table, read from the outside
//! (checkpoints and leases in the store, consumer-group offsets and watermarks on Kafka), so it
//! works while the daemon runs, from any machine, and without joining any group.

use crate::clients::Clients;
use bson::{DateTime, Document, doc};

use crate::bus::{BusError, GroupLag, Reader};
use crate::config::topics::Topics;
use crate::config::{Config, KafkaConfig};
use crate::ops::presence::MemberState;
use crate::tail::checkpoint::{CheckpointStore, MongoCheckpoints, TailPhase, TailState};
use crate::transform::ServiceTransforms;

/// One row of the table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    pub stage: String,
    pub position: String,
    pub lag: String,
    pub health: String,
}

/// A consumer group's committed offsets over `topics` against their high watermarks, read from
/// outside: the group is never joined.
pub fn group_lag(kafka: &KafkaConfig, group: &str, topics: &[String]) -> Result<GroupLag, BusError> {
    Reader::new(kafka, "ficus-status", Some(group))?.group_lag(topics)
}

fn ago(t: DateTime) -> String {
    let s = DateTime::now().saturating_duration_since(t).as_secs();
    if s < 120 {
        format!("{s}s ago")
    } else if s < 7200 {
        format!("{}m ago", s / 60)
    } else {
        format!("{}h ago", s / 3600)
    }
}

/// Builds the whole table: the tail, every consumer group, and each service's cutover.
pub async fn collect(
    cfg: &Config,
    clients: &Clients,
    topics: &Topics,
    services: &[std::sync::Arc<ServiceTransforms>],
) -> anyhow::Result<Vec<Row>> {
    let store = clients.store();
    let ownership = crate::cutover::ownership::OwnershipStore::new(&store).all().await?;
    let mut rows = vec![tail_row(cfg, &store).await?];
    // Consumer groups: one per service, and the archive.
    let pipeline = |s: &ServiceTransforms, d| crate::consume::Pipeline::of(s, d);
    let mut groups: Vec<(String, String, Vec<String>)> = services
        .iter()
        .map(|s| {
            let p = pipeline(s, crate::consume::Direction::Forward);
            (format!("consume {}", s.service()), p.group, p.topics)
        })
        .collect();
    groups.push((
        "archive".into(),
        crate::store::ARCHIVE_GROUP.into(),
        topics.defs.iter().map(|d| d.topic.clone()).collect(),
    ));
    // Reverse sync: write-back groups of the services that have owned keys.
    for s in services.iter().filter(|s| ownership.get(s.service()).is_some_and(|o| !o.periods().is_empty())) {
        let p = pipeline(s, crate::consume::Direction::Reverse);
        groups.push((format!("write-back {}", s.service()), p.group, p.topics));
    }
    for (stage, group, topics) in groups {
        let members = crate::ops::presence::live_members(&store, &group).await?;
        rows.push(match group_lag(&cfg.kafka, &group, &topics) {
            Ok(g) => Row {
                stage,
                position: format!("group {group}: {}/{} partitions committed", g.committed, g.partitions),
                lag: format!("{} msgs", g.lag),
                health: group_health(g.lag, &members),
            },
            Err(e) => {
                Row { stage, position: format!("group {group}"), lag: "?".into(), health: format!("unknown: {e}") }
            }
        });
    }
    for (service, o) in &ownership {
        rows.push(cutover_row(cfg, clients, service, o).await?);
    }
    Ok(rows)
}

/// The tail's row: its checkpoint and who holds its lease.
async fn tail_row(cfg: &Config, store: &mongodb::Database) -> anyhow::Result<Row> {
    let cp = MongoCheckpoints::new(store).load(&cfg.source.name).await?;
    let lease = crate::tail::lease::holding(store, &cfg.source.name).await?;
    let active = lease.filter(|l| l.live).map(|l| l.holder);
    let (position, lag, mut health) = match &cp {
        None => {
            ("no checkpoint (a first start takes a snapshot)".to_string(), "-".to_string(), "not started".to_string())
        }
        Some(TailState { phase: TailPhase::Snapshot(p), .. }) => (
            format!("snapshot: {} documents copied, {} collections done", p.copied, p.done.len()),
            "-".into(),
            "snapshotting".into(),
        ),
        Some(s) => {
            let token_age = s.token_time.map(|t| DateTime::now().saturating_duration_since(t).as_secs());
            let last = s.last_event_time.map_or("no change yet".to_string(), |t| format!("last change {}", ago(t)));
            let health = match token_age {
                Some(a) if a > 120 => format!("stale: resume token {a}s old"),
                _ => "ok".to_string(),
            };
            (format!("streaming, {last}"), token_age.map_or("-".into(), |a| format!("token {a}s old")), health)
        }
    };
    if active.is_none() && cp.is_some() {
        health = format!("{health}; NO ACTIVE TAILER (lease expired)");
    }
    let position = match &active {
        Some(h) => format!("{position} (active: {h})"),
        None => position,
    };
    Ok(Row { stage: format!("tail {}", cfg.source.name), position, lag, health })
}

/// A service's cutover row: its share, epoch, reverse tail, echoes and conflicts.
async fn cutover_row(
    cfg: &Config,
    clients: &Clients,
    service: &str,
    o: &crate::cutover::ownership::Ownership,
) -> anyhow::Result<Row> {
    let tail = MongoCheckpoints::new(&clients.store()).load(service).await?;
    let tail = match tail.and_then(|t| t.token_time) {
        Some(t) => format!("reverse tail token {}s old", DateTime::now().saturating_duration_since(t).as_secs()),
        None => "reverse tail not started".into(),
    };
    let conflicts = match conflicts_reported(&cfg.kafka, service) {
        Ok(n) => format!("{n} conflicts reported"),
        Err(e) => format!("conflicts unknown: {e}"),
    };
    let pending = if o.pending() { ", a change pending" } else { "" };
    let echoes = crate::sink::echoes_skipped(&clients.service(service), service).await?;
    Ok(Row {
        stage: format!("cutover {service}"),
        position: format!("{}% owned by the service (epoch {}{pending})", o.percent, o.epoch),
        lag: tail,
        health: format!("{echoes} echoes skipped, {conflicts}"),
    })
}

/// The cutover state of every service that can take over writes (or has an ownership record or
/// a move; before any, at 0%), read from outside as the table is: what `GET /cutover` serves and
/// `ficus status --json` prints.
pub async fn cutover_states(
    cfg: &Config,
    clients: &Clients,
    services: &[std::sync::Arc<ServiceTransforms>],
) -> anyhow::Result<Vec<crate::cutover::report::CutoverState>> {
    let records = CutoverRecords::read(&clients.store()).await?;
    let feeds = cutover_feeds(cfg, clients, services, &records).await?;
    Ok(records.states(services, &feeds))
}

/// The ownership records and moves: what a cutover state says of shares, fences and steps
/// (cheap to read: `GET /cutover` reads them on every request).
#[derive(Debug, Clone, Default)]
pub struct CutoverRecords {
    pub ownership: std::collections::BTreeMap<String, crate::cutover::ownership::Ownership>,
    pub moves: Vec<crate::cutover::moves::MoveRecord>,
    pub plans: Vec<crate::cutover::plans::PlanRecord>,
}

/// Per service, what its feeds say (costlier to read, re-read every few seconds): the reverse
/// feed, and the forward and write-back lags.
pub type CutoverFeeds = Vec<(String, crate::cutover::report::ReverseFeed, (Option<i64>, Option<i64>))>;

impl CutoverRecords {
    pub async fn read(store: &mongodb::Database) -> anyhow::Result<CutoverRecords> {
        let ownership = crate::cutover::ownership::OwnershipStore::new(store).all().await?;
        let moves = crate::cutover::moves::MoveStore::new(store).all().await?;
        let plans = crate::cutover::plans::PlanStore::new(store).all().await?;
        Ok(CutoverRecords { ownership, moves, plans })
    }

    /// The states of the services that can write back or have a record or a move, from these
    /// records and the feeds (pure).
    pub fn states(
        &self,
        services: &[std::sync::Arc<ServiceTransforms>],
        feeds: &CutoverFeeds,
    ) -> Vec<crate::cutover::report::CutoverState> {
        let mut out = Vec::new();
        for s in services {
            let service = s.service();
            let o = self.ownership.get(service);
            let record = self.moves.iter().find(|r| r.id == service);
            if o.is_none() && record.is_none() && s.written_back().is_empty() {
                continue;
            }
            let (feed, lags) = feeds
                .iter()
                .find(|(f, _, _)| f == service)
                .map(|(_, feed, lags)| (feed.clone(), *lags))
                .unwrap_or_default();
            let now = DateTime::now();
            let plan =
                self.plans.iter().find(|p| p.service == service).map(|p| crate::cutover::report::plan_state(p, now));
            out.push(crate::cutover::report::state(service, o, record, plan, &feed, lags));
        }
        out
    }
}

/// Every cutover service's feeds (see [`CutoverFeeds`]).
pub async fn cutover_feeds(
    cfg: &Config,
    clients: &Clients,
    services: &[std::sync::Arc<ServiceTransforms>],
    records: &CutoverRecords,
) -> anyhow::Result<CutoverFeeds> {
    use crate::cutover::report::ReverseFeed;
    let history = oplog_window(&clients.target).await;
    let checkpoints = MongoCheckpoints::new(&clients.store());
    let margin = cfg.cutover.view_max_age.as_secs().min(u64::from(u32::MAX)) as u32;
    let mut out = Vec::new();
    for s in services {
        let service = s.service();
        let o = records.ownership.get(service);
        if o.is_none() && !records.moves.iter().any(|r| r.id == service) && s.written_back().is_empty() {
            continue;
        }
        let cp = checkpoints.load(service).await?;
        let position = cp.as_ref().and_then(|c| match &c.phase {
            TailPhase::Stream(p) => Some(p.cluster_time),
            TailPhase::Snapshot(_) => None,
        });
        let feed = ReverseFeed {
            position,
            token_age_secs: cp
                .and_then(|c| c.token_time)
                .map(|t| DateTime::now().saturating_duration_since(t).as_secs()),
            history,
            needed: o.is_some_and(|o| crate::tail::reverse::needed(o, position, margin)),
        };
        let lag = |d| {
            let p = crate::consume::Pipeline::of(s, d);
            group_lag(&cfg.kafka, &p.group, &p.topics).ok().map(|g| g.lag)
        };
        let (forward, reverse) = (lag(crate::consume::Direction::Forward), lag(crate::consume::Direction::Reverse));
        out.push((service.to_string(), feed, (forward, reverse)));
    }
    Ok(out)
}

/// The oldest and newest entries of a cluster's change history (its oplog), when it can be read.
async fn oplog_window(client: &mongodb::Client) -> Option<(bson::Timestamp, bson::Timestamp)> {
    let oplog = client.database("local").collection::<Document>("oplog.rs");
    let first = oplog.find_one(doc! {}).sort(doc! { "$natural": 1 }).await.ok()??;
    let last = oplog.find_one(doc! {}).sort(doc! { "$natural": -1 }).await.ok()??;
    Some((first.get_timestamp("ts").ok()?, last.get_timestamp("ts").ok()?))
}

/// How many conflicts `<service>.conflicts` holds (within its retention).
fn conflicts_reported(kafka: &KafkaConfig, service: &str) -> Result<i64, BusError> {
    let reader = Reader::new(kafka, "ficus-status", None)?;
    let topic = crate::config::topics::conflicts_topic(service);
    let mut n = 0;
    for p in reader.partitions(&topic)? {
        let (low, high) = reader.watermarks(&topic, p)?;
        n += high - low;
    }
    Ok(n)
}

/// How a group is doing, from its lag and its live members as the registry has them (each
/// member reports the partitions it holds and whether its group is stalled).
pub fn group_health(lag: i64, members: &[(String, MemberState)]) -> String {
    let n = members.len();
    let held: usize = members.iter().map(|(_, m)| m.partitions).sum();
    if let Some((instance, m)) = members.iter().find(|(_, m)| m.stalled.is_some()) {
        let why = m.stalled.as_deref().unwrap_or_default();
        return format!("STALLED: {why} ({instance}; {n} members)");
    }
    match (n, lag) {
        (0, 0) => "caught up, no live member".into(),
        (0, lag) => format!("STOPPED: no live member, lag {lag}"),
        (_, lag) if held == 0 && lag > 0 => format!("no partitions assigned, lag {lag} ({n} members)"),
        (_, 0) => format!("ok, caught up ({n} members, {held} partitions)"),
        (_, _) => format!("consuming, behind ({n} members, {held} partitions)"),
    }
}

/// Renders rows as an aligned table.
pub fn render(rows: &[Row]) -> String {
    let w = |f: fn(&Row) -> &str, title: &str| {
        rows.iter().map(|r| f(r).chars().count()).max().unwrap_or(0).max(title.len())
    };
    let (a, b, c) = (w(|r| &r.stage, "stage"), w(|r| &r.position, "position"), w(|r| &r.lag, "lag"));
    let mut out = format!("{:<a$}  {:<b$}  {:<c$}  health\n", "stage", "position", "lag");
    for r in rows {
        out.push_str(&format!("{:<a$}  {:<b$}  {:<c$}  {}\n", r.stage, r.position, r.lag, r.health));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_health_tells_stopped_stalled_and_idle_apart() {
        let member = |partitions, stalled: Option<&str>| MemberState { partitions, stalled: stalled.map(String::from) };
        assert_eq!(group_health(0, &[]), "caught up, no live member");
        assert_eq!(group_health(7, &[]), "STOPPED: no live member, lag 7");
        let one = [("host-a".to_string(), member(0, None))];
        assert_eq!(group_health(7, &one), "no partitions assigned, lag 7 (1 members)");
        assert_eq!(group_health(0, &one), "ok, caught up (1 members, 0 partitions)");
        let stalled = [("host-a".to_string(), member(0, Some("no partitions assigned, lag 7")))];
        assert_eq!(group_health(7, &stalled), "STALLED: no partitions assigned, lag 7 (host-a; 1 members)");
        let two = [("a".to_string(), member(4, None)), ("b".to_string(), member(2, None))];
        assert_eq!(group_health(3, &two), "consuming, behind (2 members, 6 partitions)");
    }

    #[test]
    fn the_table_aligns() {
        let rows = vec![
            Row {
                stage: "tail linechatbot".into(),
                position: "streaming".into(),
                lag: "token 1s old".into(),
                health: "ok".into(),
            },
            Row {
                stage: "archive".into(),
                position: "group ficus.archive".into(),
                lag: "0 msgs".into(),
                health: "ok".into(),
            },
        ];
        let t = render(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("stage"));
        let col = lines[0].find("position").unwrap();
        assert_eq!(lines[1].find("streaming"), Some(col));
        assert_eq!(lines[2].find("group ficus.archive"), Some(col));
    }
}
