//! A transform's `[redis]` table: the target is a key-value store's entries (see
//! `transform::template`), each checked against the target fields it names.

use super::Compiler;
use super::node::{Node, Raw};
use crate::transform::model::{Fields, Shape};
use crate::transform::template::{KeyTemplate, RedisTarget, ValueShape};

const REDIS_KEYS: [&str; 4] = ["key", "shape", "expire_at", "value"];

impl Compiler<'_> {
    /// `[redis]`: `key` (a template), `shape` (`hash`, `string`, `json`), `expire_at` (a target
    /// field) and, for strings, `value` (a target field).
    pub(super) fn redis(&mut self, node: &Node, fields: &Fields) -> Option<RedisTarget> {
        let Raw::Table(entries) = &node.value else {
            self.err("redis", Some(node.line), format!("expected a table, found {}", node.value.kind()));
            return None;
        };
        let get = |name: &str| entries.iter().find(|(k, _)| k == name).map(|(_, n)| n);
        let (key, shape, expire_at, value) = (get("key"), get("shape"), get("expire_at"), get("value"));
        for (k, n) in entries.iter().filter(|(k, _)| !REDIS_KEYS.contains(&k.as_str())) {
            self.err(
                &format!("redis.{k}"),
                Some(n.line),
                format!("unknown key (expected one of: {})", REDIS_KEYS.join(", ")),
            );
        }
        let key = self.redis_key(key, node.line, fields);
        let shape = match shape {
            None => {
                self.err("redis.shape", Some(node.line), "missing: \"hash\", \"string\" or \"json\"");
                None
            }
            Some(n) => self.text("redis.shape", n).and_then(|s| {
                let shape = ValueShape::parse(&s);
                if shape.is_none() {
                    self.err("redis.shape", Some(n.line), format!("`{s}`: expected \"hash\", \"string\" or \"json\""));
                }
                shape
            }),
        };
        let expire_at = match expire_at {
            None => {
                let why = "missing: name the target field holding the entry's expiry (a date), e.g. \"expiresAt\"";
                self.err("redis.expire_at", Some(node.line), why);
                None
            }
            Some(n) => self.single_field("redis.expire_at", n, fields),
        };
        let value = match (shape, value) {
            (Some(ValueShape::String), None) => {
                self.err("redis.value", Some(node.line), "missing: a string entry names the target field it holds");
                None
            }
            (Some(ValueShape::String), Some(n)) => self.single_field("redis.value", n, fields),
            (Some(_), Some(n)) => {
                self.err("redis.value", Some(n.line), "only a `shape = \"string\"` entry names a value field");
                None
            }
            _ => None,
        };
        let string_ok = shape != Some(ValueShape::String) || value.is_some();
        match (key, shape, expire_at) {
            (Some(key), Some(shape), Some(expire_at)) if string_ok => {
                Some(RedisTarget { key, shape, expire_at, value })
            }
            _ => None,
        }
    }

    fn redis_key(&mut self, node: Option<&Node>, line: usize, fields: &Fields) -> Option<KeyTemplate> {
        let Some(n) = node else {
            self.err("redis.key", Some(line), "missing: the key template, e.g. \"cache:{kind}:{key}\"");
            return None;
        };
        let src = self.text("redis.key", n)?;
        let template = match KeyTemplate::parse(&src) {
            Ok(t) => t,
            Err(why) => {
                self.err("redis.key", Some(n.line), why);
                return None;
            }
        };
        let mut ok = true;
        for f in template.fields() {
            if !matches!(fields.iter().find(|(k, _)| k == f), Some((_, Shape::Value(_)))) {
                let why = format!("`{{{f}}}` must be a top-level field of [fields] holding a single value");
                self.err("redis.key", Some(n.line), why);
                ok = false;
            }
        }
        ok.then_some(template)
    }

    /// A setting naming one top-level single-valued target field.
    fn single_field(&mut self, at: &str, node: &Node, fields: &Fields) -> Option<String> {
        let name = self.text(at, node)?;
        match fields.iter().find(|(k, _)| *k == name) {
            Some((_, Shape::Value(_))) => Some(name),
            _ => {
                self.err(
                    at,
                    Some(node.line),
                    format!("`{name}` must be a top-level field of [fields] holding a single value"),
                );
                None
            }
        }
    }
}
