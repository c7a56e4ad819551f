//! A definition file read with its spans: each TOML value with the line it starts on, tables
//! in the order they were written, so that every problem the compiler finds names its line.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// A TOML value with the line it starts on; tables keep the order they were written in.
#[derive(Debug, Clone)]
pub(super) struct Node {
    pub(super) line: usize,
    pub(super) value: Raw,
}

#[derive(Debug, Clone)]
pub(super) enum Raw {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Array(Vec<Node>),
    Table(Vec<(String, Node)>),
    /// Something a definition never holds (a datetime, an out-of-range integer).
    Other(&'static str),
}

impl Raw {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Raw::Text(_) => "text",
            Raw::Int(_) => "an integer",
            Raw::Float(_) => "a float",
            Raw::Bool(_) => "a boolean",
            Raw::Array(_) => "an array",
            Raw::Table(_) => "a table",
            Raw::Other(what) => what,
        }
    }
}

pub(super) struct LineIndex(Vec<usize>);

impl LineIndex {
    pub(super) fn new(text: &str) -> Self {
        LineIndex(std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect())
    }
    pub(super) fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset).max(1)
    }
}

pub(super) fn table(t: &DeTable<'_>, lines: &LineIndex) -> Vec<(String, Node)> {
    let mut entries: Vec<_> = t.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    entries.into_iter().map(|(k, v)| (k.get_ref().to_string(), node(v, lines.line(k.span().start), lines))).collect()
}

pub(super) fn node(v: &Spanned<DeValue<'_>>, line: usize, lines: &LineIndex) -> Node {
    let value = match v.get_ref() {
        DeValue::String(s) => Raw::Text(s.to_string()),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Raw::Int(n),
            Err(_) => Raw::Other("an integer out of range"),
        },
        DeValue::Float(f) => match f.as_str().parse::<f64>() {
            Ok(x) if x.is_finite() => Raw::Float(x),
            _ => Raw::Other("a float that is not finite"),
        },
        DeValue::Boolean(b) => Raw::Bool(*b),
        DeValue::Datetime(_) => Raw::Other("a datetime"),
        DeValue::Array(a) => Raw::Array(a.iter().map(|e| node(e, lines.line(e.span().start), lines)).collect()),
        DeValue::Table(t) => Raw::Table(table(t, lines)),
    };
    Node { line, value }
}
