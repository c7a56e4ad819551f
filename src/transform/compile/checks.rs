//! `[[refs]]` and `[[quality]]` of a definition file into [`RefDecl`]s and [`QualityRule`]s,
//! every problem named with its field and line. Whether a reference's field is written and
//! what it names exists is checked once every service is loaded (`transform::load_all`).

use std::time::Duration;

use bson::Bson;

use super::Compiler;
use super::node::{Node, Raw};
use crate::transform::checks::{Kind, Nulls, QualityRule, RefDecl, Rule};

const REF_KEYS: [&str; 4] = ["field", "to", "nulls", "grace_secs"];
const QUALITY_KEYS: [&str; 10] =
    ["field", "required", "type", "in", "min", "max", "pattern", "unique", "mostly", "why"];

impl Compiler<'_> {
    /// `[[refs]]`: an array of tables.
    pub(super) fn refs(&mut self, node: &Node, collection: &str) -> Vec<RefDecl> {
        let mut out = Vec::new();
        for (i, t) in self.tables("refs", node).into_iter().enumerate() {
            let at = format!("refs[{i}]");
            let keys = self.keys(&at, &t, &REF_KEYS);
            let field = self.required_text(&at, "field", &keys, t.line);
            let to = self.required_text(&at, "to", &keys, t.line).and_then(|to| {
                let parts: Vec<&str> = to.split('.').collect();
                if parts.len() < 3 || parts.iter().any(|p| p.is_empty()) {
                    self.err(&format!("{at}.to"), Some(t.line), format!("`{to}` is not database.collection.field"));
                    return None;
                }
                Some((parts[0].to_string(), parts[1].to_string(), parts[2..].join(".")))
            });
            let nulls = match keys.iter().find(|(k, _)| k == "nulls") {
                None => Some(Nulls::Ignore),
                Some((_, n)) => match self.text(&format!("{at}.nulls"), n).as_deref() {
                    Some("ignore") => Some(Nulls::Ignore),
                    Some("orphan") => Some(Nulls::Orphan),
                    Some(other) => {
                        self.err(&format!("{at}.nulls"), Some(n.line), format!("`{other}`: expected ignore or orphan"));
                        None
                    }
                    None => None,
                },
            };
            let grace = match keys.iter().find(|(k, _)| k == "grace_secs") {
                None => Some(60),
                Some((_, n)) => self.count(&format!("{at}.grace_secs"), n),
            };
            if let (Some(field), Some((to_database, to_collection, to_field)), Some(nulls), Some(grace)) =
                (field, to, nulls, grace)
            {
                out.push(RefDecl {
                    collection: collection.to_string(),
                    field,
                    to_database,
                    to_collection,
                    to_field,
                    nulls,
                    grace: Duration::from_secs(grace),
                    file: self.file.to_path_buf(),
                    line: t.line,
                });
            }
        }
        out
    }

    /// `[[quality]]`: an array of tables, each a field and one or more rules for it.
    pub(super) fn quality(&mut self, node: &Node, collection: &str) -> Vec<QualityRule> {
        let mut out = Vec::new();
        for (i, t) in self.tables("quality", node).into_iter().enumerate() {
            let at = format!("quality[{i}]");
            let keys = self.keys(&at, &t, &QUALITY_KEYS);
            let Some(field) = self.required_text(&at, "field", &keys, t.line) else { continue };
            let mostly = match keys.iter().find(|(k, _)| k == "mostly") {
                None => 1.0,
                Some((_, n)) => match self.number(&format!("{at}.mostly"), n) {
                    Some(m) if (0.0..=1.0).contains(&m) && m > 0.0 => m,
                    Some(m) => {
                        self.err(&format!("{at}.mostly"), Some(n.line), format!("{m}: a share above 0, at most 1"));
                        continue;
                    }
                    None => continue,
                },
            };
            let rules = self.rules(&at, &keys);
            if rules.is_empty() {
                let why = "no rule: say required, type, in, min/max, pattern or unique";
                self.err(&at, Some(t.line), why);
            }
            for rule in rules {
                let file = self.file.to_path_buf();
                out.push(QualityRule {
                    collection: collection.to_string(),
                    field: field.clone(),
                    rule,
                    mostly,
                    file,
                    line: t.line,
                });
            }
        }
        out
    }

    /// The rules one `[[quality]]` table states.
    fn rules(&mut self, at: &str, keys: &[(String, Node)]) -> Vec<Rule> {
        let mut rules = Vec::new();
        let (mut min, mut max) = (None, None);
        for (k, n) in keys {
            let field = format!("{at}.{k}");
            match k.as_str() {
                "required" | "unique" => match &n.value {
                    Raw::Bool(true) => rules.push(if k == "required" { Rule::Required } else { Rule::Unique }),
                    Raw::Bool(false) => {}
                    other => self.err(&field, Some(n.line), format!("expected true or false, found {}", other.kind())),
                },
                "type" => {
                    if let Some(name) = self.text(&field, n) {
                        match Kind::parse(&name) {
                            Some(kind) => rules.push(Rule::Type(kind)),
                            None => self.err(
                                &field,
                                Some(n.line),
                                format!("`{name}`: expected one of {}", Kind::NAMES.join(", ")),
                            ),
                        }
                    }
                }
                "in" => match &n.value {
                    Raw::Array(items) if !items.is_empty() => {
                        let values: Vec<Bson> = items.iter().filter_map(|i| self.constant(&field, i)).collect();
                        rules.push(Rule::In(values));
                    }
                    other => {
                        self.err(&field, Some(n.line), format!("expected a non-empty array, found {}", other.kind()))
                    }
                },
                "min" => min = self.number(&field, n),
                "max" => max = self.number(&field, n),
                "pattern" => {
                    if let Some(p) = self.text(&field, n) {
                        match regex::Regex::new(&p) {
                            Ok(re) => rules.push(Rule::Pattern(re)),
                            Err(e) => self.err(&field, Some(n.line), format!("`{p}` is not a regular expression: {e}")),
                        }
                    }
                }
                _ => {}
            }
        }
        if let (Some(lo), Some(hi)) = (min, max)
            && lo > hi
        {
            self.err(&format!("{at}.min"), None, format!("min {lo} is above max {hi}: nothing could pass"));
        } else if min.is_some() || max.is_some() {
            rules.push(Rule::Range { min, max });
        }
        rules
    }

    /// An array of tables (`[[refs]]`), each with its line.
    fn tables(&mut self, name: &str, node: &Node) -> Vec<Node> {
        match &node.value {
            Raw::Array(items) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| match &item.value {
                    Raw::Table(_) => Some(item.clone()),
                    other => {
                        self.err(
                            &format!("{name}[{i}]"),
                            Some(item.line),
                            format!("expected a table, found {}", other.kind()),
                        );
                        None
                    }
                })
                .collect(),
            other => {
                let why = format!("expected an array of tables ([[{name}]]), found {}", other.kind());
                self.err(name, Some(node.line), why);
                Vec::new()
            }
        }
    }

    /// A table's entries, unknown keys reported.
    fn keys(&mut self, at: &str, t: &Node, known: &[&str]) -> Vec<(String, Node)> {
        let Raw::Table(entries) = &t.value else { return Vec::new() };
        for (k, n) in entries {
            if !known.contains(&k.as_str()) {
                self.err(
                    &format!("{at}.{k}"),
                    Some(n.line),
                    format!("unknown key (expected one of: {})", known.join(", ")),
                );
            }
        }
        entries.clone()
    }

    fn required_text(&mut self, at: &str, key: &str, keys: &[(String, Node)], line: usize) -> Option<String> {
        match keys.iter().find(|(k, _)| k == key) {
            Some((_, n)) => self.text(&format!("{at}.{key}"), n),
            None => {
                self.err(&format!("{at}.{key}"), Some(line), "missing");
                None
            }
        }
    }

    fn number(&mut self, field: &str, n: &Node) -> Option<f64> {
        match n.value {
            Raw::Int(i) => Some(i as f64),
            Raw::Float(f) => Some(f),
            ref other => {
                self.err(field, Some(n.line), format!("expected a number, found {}", other.kind()));
                None
            }
        }
    }

    fn count(&mut self, field: &str, n: &Node) -> Option<u64> {
        match n.value {
            Raw::Int(i) if i >= 0 => Some(i as u64),
            ref other => {
                self.err(field, Some(n.line), format!("expected a number of seconds, found {}", other.kind()));
                None
            }
        }
    }

    /// A value an `in` list allows: text, a number or a boolean.
    fn constant(&mut self, field: &str, n: &Node) -> Option<Bson> {
        match &n.value {
            Raw::Text(s) => Some(Bson::String(s.clone())),
            Raw::Int(i) => Some(i32::try_from(*i).map_or(Bson::Int64(*i), Bson::Int32)),
            Raw::Float(f) => Some(Bson::Double(*f)),
            Raw::Bool(b) => Some(Bson::Boolean(*b)),
            other => {
                self.err(field, Some(n.line), format!("expected text, a number or a boolean, found {}", other.kind()));
                None
            }
        }
    }
}
