//! `ficus status`: every stage's position, lag and health in one table, read from the outside
//! (checkpoints and leases in the store, consumer-group offsets and watermarks on Kafka), so it
//! works while the daemon runs, from any machine, and without joining any group.

use std::time::Duration;

use bson::{DateTime, Document, doc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, TopicPartitionList};

use crate::bus::{ClientRole, client_config};
use crate::checkpoint::{CheckpointStore, MongoCheckpoints};
use crate::config::Config;
use crate::topics::Topics;
use crate::transform::ServiceTransforms;

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub stage: String,
    pub position: String,
    pub lag: String,
    pub health: String,
}

/// A consumer group's progress over its topics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupLag {
    /// Messages not yet consumed, over all partitions.
    pub lag: i64,
    /// Partitions with a committed offset, of all partitions.
    pub committed: usize,
    pub partitions: usize,
    pub state: String,
    /// `None` when the broker does not report group members.
    pub members: Option<usize>,
}

/// A client context that keeps librdkafka's own log lines and connection errors out of the
/// command's output (brokers that do not implement group listing drop the connection, which is
/// harmless here: the member count is then reported as unknown).
pub struct Quiet;

impl rdkafka::ClientContext for Quiet {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, _fac: &str, _log_message: &str) {}
    fn error(&self, _error: rdkafka::error::KafkaError, _reason: &str) {}
}

impl rdkafka::consumer::ConsumerContext for Quiet {}

/// Reads a group's committed offsets against the topics' high watermarks. `base` is a client
/// configuration to connect with; the group is only read (offsets fetched), never joined.
pub fn group_lag(base: &ClientConfig, group: &str, topics: &[String]) -> Result<GroupLag, rdkafka::error::KafkaError> {
    let consumer: BaseConsumer<Quiet> =
        base.clone().set("group.id", group).set("enable.auto.commit", "false").create_with_context(Quiet)?;
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer.fetch_metadata(Some(t), timeout)?;
        for p in md.topics().iter().flat_map(|t| t.partitions()) {
            tpl.add_partition(t, p.id());
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    let mut out = GroupLag { partitions: committed.count(), ..Default::default() };
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout)?;
        let at = match e.offset() {
            rdkafka::Offset::Offset(o) => {
                out.committed += 1;
                o
            }
            _ => low,
        };
        out.lag += (high - at).max(0);
    }
    if let Ok(list) = consumer.fetch_group_list(Some(group), timeout)
        && let Some(g) = list.groups().first()
    {
        out.state = g.state().to_string();
        out.members = Some(g.members().len());
    }
    Ok(out)
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

/// Builds the whole table.
pub async fn collect(
    cfg: &Config,
    topics: &Topics,
    services: &[std::sync::Arc<ServiceTransforms>],
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let store_client = crate::mongo::connect(&cfg.store.uri, "status").await?;
    let store = store_client.database(&cfg.store.db);

    // Tail: checkpoint and lease.
    let cp = MongoCheckpoints::new(&store).load(&cfg.source.name).await?;
    let lease = store.collection::<Document>("leases").find_one(doc! { "_id": &cfg.source.name }).await?;
    let active = lease.as_ref().and_then(|l| {
        let exp = l.get_datetime("expires").ok()?;
        (*exp > DateTime::now()).then(|| l.get_str("holder").unwrap_or("?").to_string())
    });
    let (position, lag, mut health) = match &cp {
        None => {
            ("no checkpoint (a first start takes a snapshot)".to_string(), "-".to_string(), "not started".to_string())
        }
        Some(s) if s.snapshot.is_some() => {
            let p = s.snapshot.as_ref().expect("checked");
            (
                format!("snapshot: {} documents copied, {} collections done", p.copied, p.done.len()),
                "-".into(),
                "snapshotting".into(),
            )
        }
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
    rows.push(Row {
        stage: format!("tail {}", cfg.source.name),
        position: match &active {
            Some(h) => format!("{position} (active: {h})"),
            None => position,
        },
        lag,
        health,
    });

    // Consumer groups: one per service, and the archive.
    let base = client_config(&cfg.kafka, ClientRole::Consumer, "ficus-status");
    let mut groups: Vec<(String, String, Vec<String>)> = services
        .iter()
        .map(|s| {
            (
                format!("consume {}", s.service()),
                crate::consume::group_id(s.service()),
                s.topics().into_iter().collect(),
            )
        })
        .collect();
    groups.push((
        "archive".into(),
        crate::store::ARCHIVE_GROUP.into(),
        topics.defs.iter().map(|d| d.topic.clone()).collect(),
    ));
    for (stage, group, topics) in groups {
        let row = match tokio::task::block_in_place(|| group_lag(&base, &group, &topics)) {
            Ok(g) => Row {
                stage,
                position: format!("group {group}: {}/{} partitions committed", g.committed, g.partitions),
                lag: format!("{} msgs", g.lag),
                health: match (g.members.filter(|m| *m > 0), g.lag) {
                    (Some(m), 0) => format!("ok, caught up ({m} members)"),
                    (Some(m), _) => format!("consuming, behind ({m} members)"),
                    (None, 0) => "ok, caught up".into(),
                    (None, _) => "STOPPED? behind, and no live member reported".into(),
                },
            },
            Err(e) => {
                Row { stage, position: format!("group {group}"), lag: "?".into(), health: format!("unknown: {e}") }
            }
        };
        rows.push(row);
    }
    Ok(rows)
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
