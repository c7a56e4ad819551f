//! What a transform file declares about the data it writes, beyond how to compute it:
//! **references** to documents of another service collection (`[[refs]]`: a purchase's
//! `productId` names a product of products_db) and **data quality rules** (`[[quality]]`:
//! required fields, types, allowed values, ranges, patterns, uniqueness, each with a `mostly`
//! tolerance). `ficus verify` checks both; `ficus schema emit` turns the rules into MongoDB
//! `$jsonSchema` validators. Pure: the declarations, the paths they read and a rule's verdict
//! on one document.
//!
//! ```toml
//! [[refs]]
//! field = "purchaseHistory[].productId"      # `[]`: in every element of the array
//! to = "products_db.products.productId"      # database.collection.field
//! nulls = "ignore"                           # or "orphan": a missing or null value is broken
//! grace_secs = 60                            # younger orphans are pending, not broken
//!
//! [[quality]]
//! field = "segmentation.tier"
//! in = ["basic", "premium", "vip"]
//! mostly = 0.99                              # the share of documents that must pass (1.0)
//! ```

use std::path::PathBuf;
use std::time::Duration;

use bson::{Bson, Document};

/// What a reference does with a missing or null value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nulls {
    /// Nothing referenced: fine.
    Ignore,
    /// A reference that must be there: a missing or null value is an orphan.
    Orphan,
}

/// A declared reference: the values at `field` of the documents of `collection` name documents
/// of `to_database.to_collection` by their `to_field`.
#[derive(Debug, Clone, PartialEq)]
pub struct RefDecl {
    pub collection: String,
    pub field: String,
    pub to_database: String,
    pub to_collection: String,
    pub to_field: String,
    pub nulls: Nulls,
    /// An orphan younger than this (by its document's version) is pending: the document it
    /// names may still be on its way.
    pub grace: Duration,
    pub file: PathBuf,
    pub line: usize,
}

impl RefDecl {
    /// `customers_db.customer_events.lineUserId → customers_db.customers.lineUserId`.
    pub fn name(&self, database: &str) -> String {
        format!(
            "{database}.{}.{} → {}.{}.{}",
            self.collection, self.field, self.to_database, self.to_collection, self.to_field
        )
    }
}

/// A BSON type a rule can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    String,
    Int,
    Long,
    Double,
    Decimal,
    /// Any of int, long, double, decimal.
    Number,
    Bool,
    Date,
    ObjectId,
    Object,
    Array,
}

impl Kind {
    pub const NAMES: [&'static str; 11] =
        ["string", "int", "long", "double", "decimal", "number", "bool", "date", "objectId", "object", "array"];

    pub fn parse(s: &str) -> Option<Kind> {
        let all = [
            Kind::String,
            Kind::Int,
            Kind::Long,
            Kind::Double,
            Kind::Decimal,
            Kind::Number,
            Kind::Bool,
            Kind::Date,
            Kind::ObjectId,
            Kind::Object,
            Kind::Array,
        ];
        Kind::NAMES.iter().position(|n| *n == s).map(|i| all[i])
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::String => "string",
            Kind::Int => "int",
            Kind::Long => "long",
            Kind::Double => "double",
            Kind::Decimal => "decimal",
            Kind::Number => "number",
            Kind::Bool => "bool",
            Kind::Date => "date",
            Kind::ObjectId => "objectId",
            Kind::Object => "object",
            Kind::Array => "array",
        }
    }

    fn holds(self, v: &Bson) -> bool {
        matches!(
            (self, v),
            (Kind::String, Bson::String(_))
                | (Kind::Int, Bson::Int32(_))
                | (Kind::Long, Bson::Int64(_))
                | (Kind::Double, Bson::Double(_))
                | (Kind::Decimal, Bson::Decimal128(_))
                | (Kind::Number, Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_))
                | (Kind::Bool, Bson::Boolean(_))
                | (Kind::Date, Bson::DateTime(_))
                | (Kind::ObjectId, Bson::ObjectId(_))
                | (Kind::Object, Bson::Document(_))
                | (Kind::Array, Bson::Array(_))
        )
    }
}

/// What a quality rule asks of the values at its field.
#[derive(Debug, Clone)]
pub enum Rule {
    /// There, and not null.
    Required,
    /// Of this type (when present).
    Type(Kind),
    /// One of these values (when present).
    In(Vec<Bson>),
    /// A number within these bounds (when present).
    Range { min: Option<f64>, max: Option<f64> },
    /// Text matching this expression (when present).
    Pattern(regex::Regex),
    /// No two documents share a value (when present).
    Unique,
}

impl Rule {
    /// How the rule reads in a report: `required`, `type int`, `in [basic, premium, vip]`, ….
    pub fn describe(&self) -> String {
        match self {
            Rule::Required => "required".into(),
            Rule::Type(k) => format!("type {}", k.name()),
            Rule::In(values) => {
                let v: Vec<String> = values.iter().map(|v| v.clone().into_relaxed_extjson().to_string()).collect();
                format!("in [{}]", v.join(", "))
            }
            Rule::Range { min, max } => match (min, max) {
                (Some(lo), Some(hi)) => format!("{lo} ≤ x ≤ {hi}"),
                (Some(lo), None) => format!("≥ {lo}"),
                (None, Some(hi)) => format!("≤ {hi}"),
                (None, None) => "any number".into(),
            },
            Rule::Pattern(re) => format!("matches /{}/", re.as_str()),
            Rule::Unique => "unique".into(),
        }
    }

    /// Whether the values found at the rule's field (none: the field is absent) pass, uniqueness
    /// aside (it needs every document; see `verify`).
    pub fn passes(&self, values: &[&Bson]) -> bool {
        let present = values.iter().filter(|v| !matches!(v, Bson::Null));
        match self {
            Rule::Required => !values.is_empty() && values.iter().all(|v| !matches!(v, Bson::Null)),
            Rule::Type(k) => present.clone().all(|v| k.holds(v)),
            Rule::In(allowed) => present.clone().all(|v| allowed.contains(v)),
            Rule::Range { min, max } => present
                .clone()
                .all(|v| number(v).is_some_and(|x| min.is_none_or(|lo| x >= lo) && max.is_none_or(|hi| x <= hi))),
            Rule::Pattern(re) => present.clone().all(|v| matches!(v, Bson::String(s) if re.is_match(s))),
            Rule::Unique => true,
        }
    }
}

/// A number's value, whatever its BSON type (a Decimal128 through its text).
fn number(v: &Bson) -> Option<f64> {
    match v {
        Bson::Int32(i) => Some(f64::from(*i)),
        Bson::Int64(i) => Some(*i as f64),
        Bson::Double(d) => Some(*d),
        Bson::Decimal128(d) => d.to_string().parse().ok(),
        _ => None,
    }
}

/// A declared quality rule of one target collection.
#[derive(Debug, Clone)]
pub struct QualityRule {
    pub collection: String,
    pub field: String,
    pub rule: Rule,
    /// The share of documents that must pass (1.0: every one).
    pub mostly: f64,
    pub file: PathBuf,
    pub line: usize,
}

impl QualityRule {
    /// `customers.segmentation.tier in [basic, premium, vip]`.
    pub fn name(&self) -> String {
        format!("{}.{} {}", self.collection, self.field, self.rule.describe())
    }
}

/// The values at a path of a document: `a.b` names a field of a sub-document, `a[].b` the
/// field `b` of every element of the array `a`. Absent fields give nothing; a null gives a null.
pub fn values_at<'d>(doc: &'d Document, path: &str) -> Vec<&'d Bson> {
    let mut out = Vec::new();
    collect(doc, path, &mut out);
    out
}

fn collect<'d>(doc: &'d Document, path: &str, out: &mut Vec<&'d Bson>) {
    // The first step: up to the first `.` or `[]`.
    let (head, rest) = match (path.find('.'), path.find("[]")) {
        (Some(d), Some(b)) if b < d => (&path[..b], Some(&path[b..])),
        (Some(d), _) => (&path[..d], Some(&path[d + 1..])),
        (None, Some(b)) => (&path[..b], Some(&path[b..])),
        (None, None) => (path, None),
    };
    let Some(value) = doc.get(head) else { return };
    match rest {
        None => out.push(value),
        Some(r) if r.starts_with("[]") => {
            let rest = r[2..].strip_prefix('.');
            if let Bson::Array(items) = value {
                for item in items {
                    match (rest, item) {
                        (None, v) => out.push(v),
                        (Some(p), Bson::Document(d)) => collect(d, p, out),
                        (Some(_), _) => {}
                    }
                }
            }
        }
        Some(r) => match value {
            Bson::Document(d) => collect(d, r, out),
            Bson::Null => out.push(value),
            _ => {}
        },
    }
}

/// Whether `doc` has a value, not null, at `path` in every place the path reaches: `required`
/// of `purchaseHistory[].productId` asks it of every purchase (a document without purchases
/// passes; one purchase without a product fails).
pub fn present_everywhere(doc: &Document, path: &str) -> bool {
    let (head, rest) = match (path.find('.'), path.find("[]")) {
        (Some(d), Some(b)) if b < d => (&path[..b], Some(&path[b..])),
        (Some(d), _) => (&path[..d], Some(&path[d + 1..])),
        (None, Some(b)) => (&path[..b], Some(&path[b..])),
        (None, None) => (path, None),
    };
    match (doc.get(head), rest) {
        (None | Some(Bson::Null), Some(r)) if r.starts_with("[]") => true,
        (None | Some(Bson::Null), _) => false,
        (Some(_), None) => true,
        (Some(Bson::Array(items)), Some(r)) if r.starts_with("[]") => match r[2..].strip_prefix('.') {
            None => items.iter().all(|i| !matches!(i, Bson::Null)),
            Some(p) => items.iter().all(|i| matches!(i, Bson::Document(d) if present_everywhere(d, p))),
        },
        (Some(Bson::Document(d)), Some(r)) => present_everywhere(d, r),
        (Some(_), Some(_)) => false,
    }
}

/// The MongoDB `$jsonSchema` validator the rules of one collection imply (`ficus schema
/// emit`): `required` at each level a required path crosses, `bsonType`, `enum`, `minimum` and
/// `maximum`, `pattern`; arrays of elements (`a[].b`) through `items`. Uniqueness is not a
/// schema's to say (a unique index is), and `mostly` has no place in a validator: a rule with
/// a tolerance below 1 is left out, since the database would refuse what the rule tolerates.
pub fn json_schema<'r>(rules: impl IntoIterator<Item = &'r QualityRule>) -> Document {
    let mut schema = doc_object();
    for r in rules.into_iter().filter(|r| r.mostly >= 1.0) {
        let steps: Vec<&str> = r.field.split('.').collect();
        constrain(&mut schema, &steps, &r.rule);
    }
    schema
}

fn doc_object() -> Document {
    bson::doc! { "bsonType": "object" }
}

/// Lays a rule at `steps` into `schema` (an object schema), making the levels on the way.
fn constrain(schema: &mut Document, steps: &[&str], rule: &Rule) {
    let (step, rest) = (steps[0], &steps[1..]);
    let (name, each) = match step.strip_suffix("[]") {
        Some(n) => (n, true),
        None => (step, false),
    };
    if matches!(rule, Rule::Required) && !each {
        let required = schema.entry("required".to_string()).or_insert_with(|| Bson::Array(vec![]));
        if let Bson::Array(list) = required
            && !list.contains(&Bson::String(name.into()))
        {
            list.push(Bson::String(name.into()));
        }
    }
    let props = schema.entry("properties".to_string()).or_insert_with(|| Bson::Document(Document::new()));
    let Bson::Document(props) = props else { return };
    let field = props.entry(name.to_string()).or_insert_with(|| Bson::Document(Document::new()));
    let Bson::Document(field) = field else { return };
    let level = if each {
        field.insert("bsonType", "array");
        let items = field.entry("items".to_string()).or_insert_with(|| Bson::Document(doc_object()));
        let Bson::Document(items) = items else { return };
        items
    } else {
        field
    };
    if rest.is_empty() {
        leaf(level, rule);
    } else {
        if !each {
            level.insert("bsonType", "object");
        }
        constrain(level, rest, rule);
    }
}

/// The constraint of a rule on the field itself.
fn leaf(field: &mut Document, rule: &Rule) {
    match rule {
        Rule::Type(k) => {
            let t = match k {
                Kind::Number => Bson::Array(["int", "long", "double", "decimal"].map(Bson::from).to_vec()),
                Kind::Object => "object".into(),
                Kind::Bool => "bool".into(),
                other => other.name().into(),
            };
            field.insert("bsonType", t);
        }
        Rule::In(values) => {
            let mut allowed = values.clone();
            allowed.push(Bson::Null);
            field.insert("enum", allowed);
        }
        Rule::Range { min, max } => {
            if let Some(lo) = min {
                field.insert("minimum", lo);
            }
            if let Some(hi) = max {
                field.insert("maximum", hi);
            }
        }
        Rule::Pattern(re) => {
            field.insert("pattern", re.as_str());
        }
        Rule::Required | Rule::Unique => {}
    }
}

/// A path's field names without the element markers (`purchaseHistory[].productId` →
/// `purchaseHistory.productId`), to look it up among the fields a transform writes.
pub fn plain_path(path: &str) -> String {
    path.replace("[]", "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::tests::{shipped_topics, write_files};
    use bson::doc;

    #[test]
    fn paths_read_fields_sub_documents_and_every_element() {
        let d = doc! {
            "lineUserId": "U1",
            "segmentation": { "tier": "gold" },
            "purchaseHistory": [ { "productId": "P1" }, { "productId": null }, { "other": 1 }, { "productId": "P2" } ],
            "tags": ["a", "b"],
            "gone": null,
        };
        assert_eq!(values_at(&d, "lineUserId"), vec![&Bson::String("U1".into())]);
        assert_eq!(values_at(&d, "segmentation.tier"), vec![&Bson::String("gold".into())]);
        let ids: Vec<&Bson> = values_at(&d, "purchaseHistory[].productId");
        assert_eq!(ids, vec![&Bson::String("P1".into()), &Bson::Null, &Bson::String("P2".into())]);
        assert_eq!(values_at(&d, "tags[]").len(), 2);
        assert!(values_at(&d, "missing").is_empty());
        assert!(values_at(&d, "segmentation.missing").is_empty());
        assert_eq!(values_at(&d, "gone.deeper"), vec![&Bson::Null], "a null on the way is a null");
        assert_eq!(plain_path("purchaseHistory[].productId"), "purchaseHistory.productId");
        assert!(!present_everywhere(&d, "purchaseHistory[].productId"), "a null and a missing productId");
        assert!(present_everywhere(
            &doc! { "purchaseHistory": [ { "productId": "P" } ] },
            "purchaseHistory[].productId"
        ));
        assert!(present_everywhere(&doc! { "other": 1 }, "purchaseHistory[].productId"), "no purchases");
        assert!(present_everywhere(&d, "segmentation.tier") && !present_everywhere(&d, "segmentation.level"));
        assert!(!present_everywhere(&d, "gone") && !present_everywhere(&d, "missing"));
    }

    #[test]
    fn the_rules_imply_a_json_schema() {
        let rule = |field: &str, rule: Rule, mostly: f64| QualityRule {
            collection: "customers".into(),
            field: field.into(),
            rule,
            mostly,
            file: PathBuf::new(),
            line: 1,
        };
        let s = |x: &str| Bson::String(x.into());
        let rules = [
            rule("lineUserId", Rule::Required, 1.0),
            rule("lineUserId", Rule::Unique, 1.0),
            rule("segmentation.tier", Rule::In(vec![s("basic"), s("vip")]), 1.0),
            rule("segmentation.tier", Rule::Required, 1.0),
            rule("purchaseHistory[].productId", Rule::Required, 1.0),
            rule("purchaseHistory[].amount", Rule::Type(Kind::Decimal), 1.0),
            rule("purchaseHistory[].amount", Rule::Range { min: Some(0.0), max: None }, 1.0),
            rule("displayName", Rule::Pattern(regex::Regex::new("^x").unwrap()), 0.9),
        ];
        let got = json_schema(&rules);
        let want = doc! {
            "bsonType": "object",
            "required": ["lineUserId", "segmentation"],
            "properties": {
                "lineUserId": {},
                "segmentation": { "bsonType": "object", "properties": { "tier": { "enum": ["basic", "vip", null] } }, "required": ["tier"] },
                "purchaseHistory": { "bsonType": "array", "items": {
                    "bsonType": "object", "required": ["productId"],
                    "properties": { "productId": {}, "amount": { "bsonType": "decimal", "minimum": 0.0 } },
                } },
            },
        };
        assert_eq!(got, want, "{got}");
    }

    #[test]
    fn rules_judge_present_values_and_required_judges_presence() {
        let s = |x: &str| Bson::String(x.into());
        let tier = Rule::In(vec![s("basic"), s("premium"), s("vip")]);
        assert!(tier.passes(&[&s("vip")]) && !tier.passes(&[&s("gold")]) && tier.passes(&[]));
        assert!(tier.passes(&[&Bson::Null]), "a null is not present: `required` says whether it may be");
        assert!(!Rule::Required.passes(&[]) && !Rule::Required.passes(&[&Bson::Null]));
        assert!(Rule::Required.passes(&[&s("x")]));
        let amount = Rule::Range { min: Some(0.0), max: None };
        let dec: bson::Decimal128 = "12.50".parse().unwrap();
        assert!(amount.passes(&[&Bson::Decimal128(dec)]) && !amount.passes(&[&Bson::Int32(-1)]));
        assert!(!amount.passes(&[&s("12")]), "text is not a number");
        assert!(Rule::Type(Kind::Number).passes(&[&Bson::Int64(3), &Bson::Double(1.5)]));
        assert!(!Rule::Type(Kind::Int).passes(&[&Bson::Int64(3)]));
        let id = Rule::Pattern(regex::Regex::new("^U[0-9a-f]{32}$").unwrap());
        assert!(id.passes(&[&s("U4af4980629c1e3f2b7d5a8e9c0f1d2e3")]) && !id.passes(&[&s("u1")]));
        assert_eq!(tier.describe(), r#"in ["basic", "premium", "vip"]"#);
        assert_eq!(Kind::parse("objectId"), Some(Kind::ObjectId));
        assert_eq!(Kind::parse("float"), None);
    }

    #[test]
    fn references_and_quality_rules_are_checked_with_every_other_problem() {
        let dir = tempfile::tempdir().unwrap();
        let customers = r#"topic = "linechatbot.customers"
    events = ["customer.snapshot", "customer.created", "customer.updated", "customer.deleted"]
    collection = "customers"
    key = "lineUserId"
    [fields]
    lineUserId = "user_id"
    "segmentation.tier" = "tier"
    [fields.purchaseHistory]
    each = "purchases"
    purchaseId = "id"
    productId = "product_id"
    "#;
        let bad = format!(
            "{customers}
    [[refs]]
    field = \"purchaseHistory[].productId\"
    to = \"shop_db.products.productId\"
    [[refs]]
    field = \"nickname\"
    to = \"a_db.customers.lineUserId\"
    nulls = \"maybe\"
    [[refs]]
    field = \"lineUserId\"
    to = \"a_db.customers.displayName\"
    [[refs]]
    field = \"lineUserId\"
    to = \"nodots\"
    [[quality]]
    field = \"segmentation.tier\"
    in = [\"basic\"]
    mostly = 1.5
    [[quality]]
    field = \"segmentation.level\"
    pattern = \"([\"
    [[quality]]
    field = \"lineUserId\"
    min = 5
    max = 1
    [[quality]]
    field = \"lineUserId\"
    colour = \"red\"
    "
        );
        write_files(dir.path(), &[("a_db/customers.toml", &bad)]);
        let text = crate::transform::load_all(dir.path(), &shipped_topics()).unwrap_err().to_string();
        for needle in [
            "refs[1].nulls: `maybe`: expected ignore or orphan",
            "refs[3].to: `nodots` is not database.collection.field",
            "quality[0].mostly: 1.5: a share above 0, at most 1",
            "quality[1].pattern: `([` is not a regular expression",
            "quality[2].min: min 5 is above max 1",
            "quality[3].colour: unknown key",
            "quality[3]: no rule",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        // Once each file compiles, what a reference names is checked across services.
        let names = format!(
            "{customers}
    [[refs]]
    field = \"purchaseHistory[].productId\"
    to = \"shop_db.products.productId\"
    [[refs]]
    field = \"nickname\"
    to = \"a_db.customers.lineUserId\"
    [[refs]]
    field = \"lineUserId\"
    to = \"a_db.customers.displayName\"
    [[refs]]
    field = \"lineUserId\"
    to = \"a_db.orders.id\"
    "
        );
        write_files(dir.path(), &[("a_db/customers.toml", &names)]);
        let text = crate::transform::load_all(dir.path(), &shipped_topics()).unwrap_err().to_string();
        for needle in [
            "refs.to: `shop_db.products.productId`: no service writes a database `shop_db`",
            "refs.field: `nickname` is not a field the transforms write into customers",
            "refs.to: `a_db.customers.displayName`: a_db.customers has no field `displayName` its transforms write",
            "refs.to: `a_db.orders.id`: a_db writes no collection `orders`",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
