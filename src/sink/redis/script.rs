//! The one server-side script every Redis write goes through: the version guard and the write
//! it guards, atomic in Redis (a script runs alone), so no redelivery, replay or second writer
//! can land between the check and the write.
//!
//! `KEYS[1]` is the entry, `KEYS[2]` its version record. `ARGV[1]` says what to do (`hash`,
//! `text` or `del`), `ARGV[2]` is the write's version record, `ARGV[3]` the entry's absolute
//! expiry in epoch milliseconds, `ARGV[4]` how long a tombstone lives when the entry it buries
//! had no expiry of its own, `ARGV[5…]` the value (hash fields and values, or the text). A
//! record as new as the write's, or newer, wins: the script returns 0 and writes nothing.
//! Otherwise it returns 1 for a write and 2 for a delete. An entry and its record expire at the
//! same instant (PEXPIREAT / PXAT, the monolith's `expires_at`), so a replay never extends an
//! entry's life; a delete keeps the record as a tombstone until the entry would have expired
//! (KEEPTTL), or for the tombstone TTL when it had no record.

use redis::Script;

use super::plan::{Planned, Value, Write};

pub const SOURCE: &str = r#"
local held = redis.call('GET', KEYS[2])
if held and held >= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[1] == 'del' then
  if redis.call('PTTL', KEYS[2]) > 0 then
    redis.call('SET', KEYS[2], ARGV[2], 'KEEPTTL')
  else
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
  end
  return 2
end
if ARGV[1] == 'hash' then
  if #ARGV >= 6 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
else
  redis.call('SET', KEYS[1], ARGV[5])
end
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PXAT', ARGV[3])
return 1
"#;

/// What the script said of one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A newer (or the same) version was there: nothing written.
    Skipped,
    Written,
    Deleted,
}

impl Outcome {
    pub fn of(code: i64) -> Outcome {
        match code {
            1 => Outcome::Written,
            2 => Outcome::Deleted,
            _ => Outcome::Skipped,
        }
    }
}

/// The script, with its SHA1 for EVALSHA.
pub fn script() -> Script {
    Script::new(SOURCE)
}

/// The arguments (after the two keys) of one planned write.
pub fn args(p: &Planned<'_>, tombstone_ttl_ms: i64) -> Vec<String> {
    let mut out = Vec::with_capacity(6);
    match &p.write {
        Write::Delete { .. } => {
            out.extend(["del".to_string(), p.record.clone(), "0".into(), tombstone_ttl_ms.to_string()]);
        }
        Write::Set { value, expire_at } => {
            let op = if matches!(value, Value::Hash(_)) { "hash" } else { "text" };
            out.extend([op.to_string(), p.record.clone(), expire_at.to_string(), tombstone_ttl_ms.to_string()]);
            match value {
                Value::Hash(fields) => {
                    for (k, v) in fields {
                        out.push(k.clone());
                        out.push(v.clone());
                    }
                }
                Value::Text(t) => out.push(t.clone()),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_carry_the_record_the_expiry_and_the_value() {
        let hash = Planned {
            key: "k",
            record: "v|c".into(),
            write: Write::Set { value: Value::Hash(vec![("a".into(), "1".into())]), expire_at: 42 },
        };
        assert_eq!(args(&hash, 7), ["hash", "v|c", "42", "7", "a", "1"]);
        let text = Planned {
            key: "k",
            record: "v|c".into(),
            write: Write::Set { value: Value::Text("x".into()), expire_at: 9 },
        };
        assert_eq!(args(&text, 7), ["text", "v|c", "9", "7", "x"]);
        let del = Planned { key: "k", record: "v|c".into(), write: Write::Delete { expired: true } };
        assert_eq!(args(&del, 7), ["del", "v|c", "0", "7"]);
        assert_eq!(
            [Outcome::of(0), Outcome::of(1), Outcome::of(2)],
            [Outcome::Skipped, Outcome::Written, Outcome::Deleted]
        );
    }
}
