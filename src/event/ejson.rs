//! Document values inside events are MongoDB **canonical** Extended JSON v2, which keeps every
//! BSON type through the round trip (an Int32 stays an Int32, a Decimal128 a Decimal128, a Date a
//! Date); relaxed JSON would fold Int32/Int64/Double together.
//!
//! Field names that begin with `$` (legal in MongoDB documents since 5.0) would be read back as
//! Extended JSON type wrappers (`{"$numberInt": "5"}` is the number 5), so every such name is
//! written with one more `$` (`$numberInt` → `$$numberInt`) and [`from_ejson`] strips it again.
//! Type wrappers never begin with `$$`, so the escape is unambiguous.

use bson::{Bson, Document};
use serde_json::Value;

/// A document as escaped canonical Extended JSON.
pub(crate) fn doc_to_json(doc: &Document) -> Value {
    to_ejson(&Bson::Document(doc.clone()))
}

/// Canonical Extended JSON of a value, with `$`-prefixed field names escaped. Values without
/// such names, nearly all of them, are converted as they are.
pub fn to_ejson(b: &Bson) -> Value {
    if has_dollar_keys(b, "$") {
        escape_keys(b.clone()).into_canonical_extjson()
    } else {
        b.clone().into_canonical_extjson()
    }
}

/// Parses Extended JSON written by [`to_ejson`], undoing its escape.
pub fn from_ejson(v: Value) -> Result<Bson, bson::error::Error> {
    let b = Bson::try_from(v)?;
    Ok(if has_dollar_keys(&b, "$$") { unescape_keys(b) } else { b })
}

fn has_dollar_keys(b: &Bson, prefix: &str) -> bool {
    match b {
        Bson::Document(d) => d.iter().any(|(k, v)| k.starts_with(prefix) || has_dollar_keys(v, prefix)),
        Bson::Array(a) => a.iter().any(|v| has_dollar_keys(v, prefix)),
        _ => false,
    }
}

fn rename_keys(b: Bson, rename: &impl Fn(String) -> String) -> Bson {
    match b {
        Bson::Document(d) => Bson::Document(d.into_iter().map(|(k, v)| (rename(k), rename_keys(v, rename))).collect()),
        Bson::Array(a) => Bson::Array(a.into_iter().map(|v| rename_keys(v, rename)).collect()),
        other => other,
    }
}

fn escape_keys(b: Bson) -> Bson {
    rename_keys(b, &|k| if k.starts_with('$') { format!("${k}") } else { k })
}

fn unescape_keys(b: Bson) -> Bson {
    rename_keys(b, &|k| if k.starts_with("$$") { k[1..].to_string() } else { k })
}
