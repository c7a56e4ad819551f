//! What `ficus replay` and `ficus verify` do in Redis: clear a rebuild's prefix, swap a rebuilt
//! prefix into the live keys, and read entries back with their absolute expiry.
//!
//! The swap is key by key (Redis renames one key at a time; there is no rename of a prefix):
//! each rebuilt entry and its version record are renamed over the live ones by a script that
//! keeps the live pair when its version is as new or newer (the live consumer went on writing
//! during the rebuild), and then every live entry the rebuild did not produce is removed with
//! its record (its document is gone from the monolith). Readers see old and rebuilt entries
//! side by side for the moments the swap takes, never a missing one that the rebuild has.
//! SCAN walks only ficus's version records (`ficus:<service>:…`), so keys ficus did not write
//! are never touched.

use std::collections::HashSet;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use super::plan::{Layout, Value, record_target, record_version};
use crate::sink::SinkError;

/// Moves one rebuilt key over the live one unless the live one is as new or newer.
/// KEYS: shadow entry, shadow record, live entry, live record. Returns 1 moved, 0 kept.
const SWAP: &str = r#"
local built = redis.call('GET', KEYS[2])
local live = redis.call('GET', KEYS[4])
if built and live and string.sub(live, 1, 30) >= string.sub(built, 1, 30) then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('RENAME', KEYS[1], KEYS[3]) else redis.call('DEL', KEYS[3]) end
if built then redis.call('RENAME', KEYS[2], KEYS[4]) end
return 1
"#;

const SCAN_COUNT: usize = 1000;

/// Every entry key (in `layout`'s terms) that has a version record, as SCAN finds them.
pub async fn keys(conn: &ConnectionManager, layout: &Layout) -> Result<Vec<String>, SinkError> {
    let mut conn = conn.clone();
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(layout.versions_pattern())
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(&mut conn)
            .await?;
        out.extend(batch.iter().filter_map(|k| layout.key_of(k)).map(str::to_string));
        if next == 0 {
            break;
        }
        cursor = next;
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Removes every entry and record of a layout (a rebuild's prefix, before it starts).
pub async fn clear(conn: &ConnectionManager, layout: &Layout) -> Result<u64, SinkError> {
    let keys = keys(conn, layout).await?;
    let mut c = conn.clone();
    for chunk in keys.chunks(SCAN_COUNT) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.del(layout.entry(k)).ignore().del(layout.version(k)).ignore();
        }
        let () = pipe.query_async(&mut c).await?;
    }
    Ok(keys.len() as u64)
}

/// What a swap did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swapped {
    /// Rebuilt keys renamed over the live ones.
    pub moved: u64,
    /// Rebuilt keys the live consumer had already written as new or newer.
    pub kept: u64,
    /// Live keys the rebuild did not produce, removed.
    pub removed: u64,
}

/// Swaps the rebuilt `shadow` into `live` (see the module header).
pub async fn swap(conn: &ConnectionManager, shadow: &Layout, live: &Layout) -> Result<Swapped, SinkError> {
    let built = keys(conn, shadow).await?;
    let mut c = conn.clone();
    let mut done = Swapped::default();
    for chunk in built.chunks(SCAN_COUNT) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("EVAL").arg(SWAP).arg(4);
            pipe.arg(shadow.entry(k)).arg(shadow.version(k)).arg(live.entry(k)).arg(live.version(k));
        }
        let moved: Vec<i64> = pipe.query_async(&mut c).await?;
        let n = moved.iter().filter(|m| **m == 1).count() as u64;
        done.moved += n;
        done.kept += moved.len() as u64 - n;
    }
    let rebuilt: HashSet<&str> = built.iter().map(String::as_str).collect();
    let stale: Vec<String> = keys(conn, live).await?.into_iter().filter(|k| !rebuilt.contains(k.as_str())).collect();
    for chunk in stale.chunks(SCAN_COUNT) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.del(live.entry(k)).ignore().del(live.version(k)).ignore();
        }
        let () = pipe.query_async(&mut c).await?;
    }
    done.removed = stale.len() as u64;
    Ok(done)
}

/// An entry as Redis holds it: its value and absolute expiry (epoch ms; `None`: none).
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub value: Value,
    pub expire_at: Option<i64>,
    /// The version its record holds.
    pub version: Option<String>,
    /// The target its record names.
    pub target: Option<String>,
}

/// Reads one entry (`None` when it is not there: deleted, expired, or a tombstone only).
pub async fn read(conn: &ConnectionManager, layout: &Layout, key: &str) -> Result<Option<Held>, SinkError> {
    let mut c = conn.clone();
    let entry = layout.entry(key);
    let kind: String = redis::cmd("TYPE").arg(&entry).query_async(&mut c).await?;
    let value = match kind.as_str() {
        "none" => return Ok(None),
        "hash" => {
            let mut fields: Vec<(String, String)> = c.hgetall(&entry).await?;
            fields.sort();
            Value::Hash(fields)
        }
        "string" => Value::Text(c.get(&entry).await?),
        other => Value::Text(format!("(a Redis {other}, not an entry ficus writes)")),
    };
    let at: i64 = redis::cmd("PEXPIRETIME").arg(&entry).query_async(&mut c).await?;
    let record: Option<String> = c.get(layout.version(key)).await?;
    Ok(Some(Held {
        value,
        expire_at: (at >= 0).then_some(at),
        version: record.as_deref().map(|r| record_version(r).to_string()),
        target: record.as_deref().and_then(record_target).map(str::to_string),
    }))
}
