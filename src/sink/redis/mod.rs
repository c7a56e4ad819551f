//! The Redis sink: a service whose transforms declare `[redis]` (the cache service) keeps its
//! entries in Redis, through the one apply path like every other target. Everything that
//! speaks Redis lives here: the key layout and the pure write plan ([`plan`]), the guarded
//! write ([`script`]), and this adapter, which sends a batch's writes as one pipeline of
//! EVALSHA calls (EVAL when the server has lost the script: a restart, SCRIPT FLUSH), holds
//! writes back while Redis is near its memory limit, and refuses a Redis that would evict.
//! The rebuild of `ficus replay` and the comparison of `ficus verify` are in [`rebuild`].
//!
//! Guarantees, the same as a MongoDB target's: a write lands only over an older version (its
//! version record, `ficus:<service>:v:<key>`, checked and written in the same script), a delete
//! leaves that record as a tombstone, so redelivery and reordering never regress an entry. And
//! the one Redis has of its own: every entry expires at the monolith's `expires_at` itself
//! (PEXPIREAT), never a TTL counted from the write, so a replay or a late redelivery never
//! extends its life; an event whose entry has already expired when it arrives deletes it
//! (`ficus_redis_expired_on_arrival_total{service}`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use super::{Marker, Sink, SinkError, Versioned};
use crate::retry::ErrorClass;
use crate::transform::{ServiceTransforms, WriteOp};

pub mod plan;
pub mod rebuild;
pub mod script;

use plan::{Layout, Planned, Write};
use script::Outcome;

/// The only `maxmemory-policy` ficus writes under: every other policy evicts keys without a
/// word (the `volatile-*` ones exactly ficus's, which all carry an expiry), losing entries and
/// the version records that guard them.
pub const REQUIRED_POLICY: &str = "noeviction";

/// How often the memory reading is taken again while writing.
const MEMORY_EVERY: Duration = Duration::from_secs(1);

/// What `INFO memory` says.
#[derive(Debug, Clone, PartialEq)]
pub struct Memory {
    pub used: u64,
    /// 0: no limit.
    pub max: u64,
    pub policy: String,
}

impl Memory {
    /// Parses the `INFO memory` section.
    pub fn parse(info: &str) -> Option<Memory> {
        let field =
            |name: &str| info.lines().find_map(|l| l.trim_end().strip_prefix(name).and_then(|r| r.strip_prefix(':')));
        Some(Memory {
            used: field("used_memory")?.parse().ok()?,
            max: field("maxmemory")?.parse().ok()?,
            policy: field("maxmemory_policy")?.to_string(),
        })
    }

    /// The share of maxmemory used; `None` without a limit.
    pub fn share(&self) -> Option<f64> {
        (self.max > 0).then(|| self.used as f64 / self.max as f64)
    }

    /// Why ficus must not write into this Redis, if it must not: any policy but `noeviction`,
    /// whatever maxmemory is now (a `CONFIG SET maxmemory` at run time would start evicting).
    pub fn refusal(&self, at: &str) -> Option<String> {
        (self.policy != REQUIRED_POLICY).then(|| {
            format!(
                "Redis at {at} has maxmemory-policy `{}`, which evicts keys silently when memory runs out: ficus \
                 would lose entries and the version records that guard them. Set `maxmemory-policy noeviction` \
                 (CONFIG SET maxmemory-policy noeviction, and in redis.conf); ficus pauses its writes before the \
                 limit instead ([redis] pause_above)",
                self.policy
            )
        })
    }
}

/// The Redis sink of one service.
#[derive(Clone)]
pub struct RedisSink {
    conn: ConnectionManager,
    transforms: Arc<ServiceTransforms>,
    layout: Layout,
    /// Where the connection goes, password redacted (for messages).
    at: String,
    tombstone_ttl_ms: i64,
    pause_above: f64,
    memory: Arc<Mutex<Option<(Instant, Memory)>>>,
}

impl RedisSink {
    /// Opens the sink, refusing a Redis whose eviction policy would lose ficus's keys
    /// ([`SinkError::Evicting`], fatal and bad input: `ficus run` exits 2).
    pub async fn open(
        conn: ConnectionManager,
        at: String,
        transforms: Arc<ServiceTransforms>,
        layout: Layout,
        tombstone_ttl: Duration,
        pause_above: f64,
    ) -> Result<Self, SinkError> {
        let sink = RedisSink {
            conn,
            layout,
            at,
            tombstone_ttl_ms: tombstone_ttl.as_millis().min(i64::MAX as u128) as i64,
            pause_above,
            memory: Arc::new(Mutex::new(None)),
            transforms,
        };
        let memory = sink.read_memory().await?;
        if let Some(why) = memory.refusal(&sink.at) {
            return Err(SinkError::Evicting(why));
        }
        if memory.max == 0 {
            tracing::warn!(service = %sink.service(), at = %sink.at, "Redis has no maxmemory: ficus cannot pause before memory runs out");
        }
        sink.paused(false);
        Ok(sink)
    }

    fn service(&self) -> &str {
        self.transforms.service()
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    async fn read_memory(&self) -> Result<Memory, SinkError> {
        let info: String = redis::cmd("INFO").arg("memory").query_async(&mut self.conn.clone()).await?;
        Memory::parse(&info)
            .ok_or_else(|| SinkError::Unsupported(format!("Redis at {}: INFO memory unreadable", self.at)))
    }

    fn paused(&self, paused: bool) {
        metrics::gauge!("ficus_redis_paused", "service" => self.service().to_string()).set(if paused {
            1.0
        } else {
            0.0
        });
    }

    /// Back-pressure: a transient [`SinkError::Paused`] while Redis uses more than the pause
    /// share of its maxmemory (read at most once a second), so the apply path backs off and
    /// tries again, draining on SIGTERM like any other wait, and nothing is written to be evicted.
    async fn hold_for_memory(&self) -> Result<(), SinkError> {
        let fresh = self
            .memory
            .lock()
            .ok()
            .and_then(|m| m.as_ref().filter(|(at, _)| at.elapsed() < MEMORY_EVERY).map(|(_, m)| m.clone()));
        let memory = match fresh {
            Some(m) => m,
            None => {
                let m = self.read_memory().await?;
                if let Ok(mut cell) = self.memory.lock() {
                    *cell = Some((Instant::now(), m.clone()));
                }
                m
            }
        };
        if let Some(why) = memory.refusal(&self.at) {
            // Changed at run time: hold everything until it is set back.
            self.paused(true);
            return Err(SinkError::Paused(why));
        }
        match memory.share() {
            Some(share) if share > self.pause_above => {
                self.paused(true);
                Err(SinkError::Paused(format!(
                    "Redis at {} uses {:.0}% of its maxmemory, above the {:.0}% ficus pauses at ([redis] pause_above)",
                    self.at,
                    share * 100.0,
                    self.pause_above * 100.0
                )))
            }
            _ => {
                self.paused(false);
                Ok(())
            }
        }
    }

    /// Sends the planned writes as one pipeline of script calls; on NOSCRIPT (the server lost
    /// its script cache) the whole pipeline again with EVAL, which is safe: every call is guarded.
    async fn send(&self, writes: &[Planned<'_>]) -> Result<Vec<Outcome>, SinkError> {
        let script = script::script();
        let pipeline = |by_sha: bool| {
            let mut pipe = redis::pipe();
            for p in writes {
                let cmd = pipe.cmd(if by_sha { "EVALSHA" } else { "EVAL" });
                cmd.arg(if by_sha { script.get_hash() } else { script::SOURCE });
                cmd.arg(2).arg(self.layout.entry(p.key)).arg(self.layout.version(p.key));
                cmd.arg(script::args(p, self.tombstone_ttl_ms));
            }
            pipe
        };
        let mut conn = self.conn.clone();
        let codes: Vec<i64> = match pipeline(true).query_async(&mut conn).await {
            Err(e) if e.code() == Some("NOSCRIPT") => pipeline(false).query_async(&mut conn).await?,
            done => done?,
        };
        Ok(codes.into_iter().map(Outcome::of).collect())
    }
}

impl RedisSink {
    /// Records that a partition finished a snapshot; once every partition of the topic has,
    /// deletes the target's entries still older than the snapshot (guarded like any delete, so
    /// an entry written since stays). Done again on redelivery, which changes nothing.
    async fn sweep(&self, s: &plan::Sweep<'_>) -> Result<(), SinkError> {
        let set = self.layout.snapshot(s.collection, s.before);
        let mut c = self.conn.clone();
        let (reported,): (i64,) = redis::pipe()
            .sadd(&set, s.partition)
            .ignore()
            .pexpire(&set, self.tombstone_ttl_ms)
            .ignore()
            .scard(&set)
            .query_async(&mut c)
            .await?;
        if reported < i64::from(s.partitions) {
            return Ok(());
        }
        let keys = rebuild::keys(&self.conn, &self.layout).await?;
        let record = plan::version_record(s.before, s.collection);
        let mut deleted = 0;
        for chunk in keys.chunks(1000) {
            let versions: Vec<String> = chunk.iter().map(|k| self.layout.version(k)).collect();
            let records: Vec<Option<String>> = redis::cmd("MGET").arg(&versions).query_async(&mut c).await?;
            let read: Vec<(String, Option<String>)> = chunk.iter().cloned().zip(records).collect();
            let writes: Vec<Planned<'_>> = plan::swept(&read, s.collection, s.before)
                .into_iter()
                .map(|key| Planned { key, record: record.clone(), write: Write::Delete { expired: false } })
                .collect();
            if !writes.is_empty() {
                deleted += self.send(&writes).await?.iter().filter(|o| **o == Outcome::Deleted).count();
            }
        }
        tracing::info!(service = %self.service(), target = s.collection, before = %s.before, deleted, "snapshot complete: swept the entries it no longer has");
        Ok(())
    }
}

impl Sink for RedisSink {
    type Op = WriteOp;

    async fn apply(&self, batch: &[Versioned], marker: Option<&Marker>) -> Result<(), SinkError> {
        if marker.is_some() {
            return Err(SinkError::Unsupported("a Redis target never writes back: no apply markers".into()));
        }
        self.hold_for_memory().await?;
        let now = bson::DateTime::now().timestamp_millis();
        let planned = plan::plan(batch, |c| self.transforms.redis_target(c), now).map_err(|r| SinkError::Entry {
            collection: r.collection,
            key: r.key,
            why: r.why,
        })?;
        let outcomes = if planned.writes.is_empty() { Vec::new() } else { self.send(&planned.writes).await? };
        for sweep in &planned.sweeps {
            self.sweep(sweep).await?;
        }
        let expired = planned
            .writes
            .iter()
            .zip(&outcomes)
            .filter(|(p, o)| matches!(p.write, Write::Delete { expired: true }) && **o != Outcome::Skipped)
            .count();
        if expired > 0 {
            metrics::counter!("ficus_redis_expired_on_arrival_total", "service" => self.service().to_string())
                .increment(expired as u64);
        }
        Ok(())
    }
}

/// What a Redis error calls for: a connection that dropped, timed out or was refused, a server
/// loading or busy, and OOM (memory full under `noeviction`: back-pressure) are transient;
/// authentication and everything else the library would not retry are fatal.
pub fn classify(e: &redis::RedisError) -> ErrorClass {
    if e.kind() == redis::ErrorKind::AuthenticationFailed || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
    {
        return ErrorClass::Fatal;
    }
    if matches!(e.code(), Some("OOM" | "NOSCRIPT" | "LOADING" | "BUSY")) || e.is_io_error() || e.is_timeout() {
        return ErrorClass::Transient;
    }
    match e.retry_method() {
        redis::RetryMethod::NoRetry => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\nmaxmemory:2097152\r\nmaxmemory_human:2.00M\r\nmaxmemory_policy:allkeys-lru\r\n";

    #[test]
    fn memory_is_read_from_info_and_an_evicting_policy_is_refused_by_name() {
        let m = Memory::parse(INFO).unwrap();
        assert_eq!(m, Memory { used: 1_048_576, max: 2_097_152, policy: "allkeys-lru".into() });
        assert_eq!(m.share(), Some(0.5));
        let why = m.refusal("redis://127.0.0.1:6379").unwrap();
        assert!(why.contains("`allkeys-lru`") && why.contains("maxmemory-policy noeviction"), "{why}");
        let ok = Memory { policy: "noeviction".into(), max: 0, ..m };
        assert_eq!((ok.refusal("x"), ok.share()), (None, None));
        let volatile = Memory { policy: "volatile-ttl".into(), max: 0, used: 1 };
        assert!(volatile.refusal("x").is_some(), "even without a limit now: every ficus key has an expiry");
        assert_eq!(Memory::parse("# Memory\r\nused_memory:1\r\n"), None);
    }
}
