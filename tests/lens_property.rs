//! Property: the derived reverse of every shipped transform obeys the lens laws (GetPut, PutGet
//! over the generated edits, Insert) on generated monolith documents in the shapes of
//! `shared/reference/monolith-schema.md`, hostile ones included: every BSON type in fields the
//! transforms read and in fields they do not, `$`-prefixed and dotted keys inside the free-form
//! sub-documents (`meta`, `specs`, `details`, `payload`, `values`, `th`), missing optional
//! fields, nulls, legacy types (decimals as doubles or integers, dates as text or epoch
//! milliseconds), repeated and missing element ids. No server is needed: the check is pure.
//!
//! A document the forward rejects (live traffic would dead-letter it) has no law to obey; each
//! test also requires that most generated documents were actually checked, so the property
//! cannot hold by rejecting everything.

use std::cell::Cell;
use std::path::Path;

use bson::oid::ObjectId;
use bson::spec::BinarySubtype;
use bson::{Binary, Bson, DateTime, Decimal128, Document, Regex, Timestamp};
use ficus::config::topics::Topics;
use ficus::transform::{ServiceTransforms, check_laws, load_all};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn shipped() -> (Topics, Vec<ServiceTransforms>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let topics = ficus::config::topics::load(&root.join("topics")).unwrap_or_else(|r| panic!("{r}"));
    let services = load_all(&root.join("transforms"), &topics).unwrap_or_else(|r| panic!("{r}"));
    (topics, services)
}

type S<T> = BoxedStrategy<T>;

// ---- values ----

fn text() -> S<String> {
    prop_oneof![
        6 => "[a-zA-Z0-9 ._-]{0,12}",
        1 => Just("สวัสดีครับ".to_string()),
        1 => Just(String::new()),
        1 => Just("$oid".to_string()),
    ]
    .boxed()
}

fn decimal_text() -> S<String> {
    prop_oneof![
        4 => "[0-9]{1,6}\\.[0-9]{2}",
        1 => "-?[0-9]{1,4}",
        1 => "[0-9]{1,3}\\.[0-9]{1,9}",
    ]
    .boxed()
}

fn date() -> S<DateTime> {
    (946_684_800_000_i64..4_102_444_800_000).prop_map(DateTime::from_millis).boxed()
}

/// Every BSON type, edge values included.
fn scalar() -> S<Bson> {
    prop_oneof![
        Just(Bson::Null),
        any::<bool>().prop_map(Bson::Boolean),
        any::<i32>().prop_map(Bson::Int32),
        any::<i64>().prop_map(Bson::Int64),
        any::<f64>().prop_map(Bson::Double),
        prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-0.0), Just(1e300)].prop_map(Bson::Double),
        decimal_text().prop_filter_map("decimal", |s| s.parse::<Decimal128>().ok().map(Bson::Decimal128)),
        text().prop_map(Bson::String),
        (-62_135_596_800_000_i64..253_402_300_799_999).prop_map(|ms| Bson::DateTime(DateTime::from_millis(ms))),
        any::<[u8; 12]>().prop_map(|b| Bson::ObjectId(ObjectId::from_bytes(b))),
        vec(any::<u8>(), 0..6).prop_map(|bytes| Bson::Binary(Binary { subtype: BinarySubtype::Generic, bytes })),
        Just(()).prop_filter_map("a regex", |()| {
            let (pattern, options) = ("^a.*".to_string().try_into().ok()?, "i".to_string().try_into().ok()?);
            Some(Bson::RegularExpression(Regex { pattern, options }))
        }),
        any::<(u32, u32)>().prop_map(|(time, increment)| Bson::Timestamp(Timestamp { time, increment })),
        Just(Bson::JavaScriptCode("function () {}".into())),
        Just(Bson::Symbol("sym".into())),
        Just(Bson::MinKey),
        Just(Bson::MaxKey),
        Just(Bson::Undefined),
    ]
    .boxed()
}

/// Keys a free-form sub-document may hold: `$`-prefixed, dotted, empty, snake and camel case.
fn key() -> S<String> {
    prop_oneof![
        4 => "[a-z]{1,5}(_[a-z0-9]{1,4}){0,2}",
        1 => "[a-z]{1,4}[A-Z][a-z]{1,3}",
        1 => prop_oneof![
            Just("$oid"), Just("$numberInt"), Just("$date"), Just("a.b"), Just("$x.y"), Just(""), Just("_id"),
            Just("ชื่อ_ไทย"), Just("a_"), Just("_private"), Just("HTTPCode"),
        ]
        .prop_map(String::from),
    ]
    .boxed()
}

fn hostile() -> S<Bson> {
    scalar()
        .prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..4).prop_map(Bson::Array),
                vec((key(), inner), 0..4).prop_map(|kv| Bson::Document(kv.into_iter().collect())),
            ]
        })
        .boxed()
}

/// A free-form sub-document: hostile keys, any values.
fn free() -> S<Bson> {
    vec((key(), hostile()), 0..5).prop_map(|kv| Bson::Document(kv.into_iter().collect::<Document>())).boxed()
}

/// A field as the monolith holds it: mostly the typed value, sometimes absent, null, or any BSON.
fn f(typed: S<Bson>) -> S<Option<Bson>> {
    prop_oneof![
        30 => typed.prop_map(Some),
        3 => Just(None),
        1 => Just(Some(Bson::Null)),
        1 => hostile().prop_map(Some),
    ]
    .boxed()
}

/// A field that is always there with its type (keys, array element ids mostly).
fn sure(typed: S<Bson>) -> S<Option<Bson>> {
    prop_oneof![40 => typed.prop_map(Some), 1 => Just(None), 1 => hostile().prop_map(Some)].boxed()
}

fn s(t: S<String>) -> S<Bson> {
    t.prop_map(Bson::String).boxed()
}

fn pick(xs: &'static [&'static str]) -> S<Bson> {
    proptest::sample::select(xs).prop_map(|x| Bson::String(x.to_string())).boxed()
}

fn int(max: i32) -> S<Bson> {
    prop_oneof![4 => (0..max).prop_map(Bson::Int32), 1 => (0..i64::from(max)).prop_map(Bson::Int64)].boxed()
}

fn double() -> S<Bson> {
    prop_oneof![4 => (0.0..1000.0f64).prop_map(Bson::Double), 1 => (0..1000i32).prop_map(Bson::Int32)].boxed()
}

fn when() -> S<Bson> {
    date().prop_map(Bson::DateTime).boxed()
}

/// A date the way legacy writers left it too: RFC 3339 text, epoch milliseconds.
fn legacy_date() -> S<Bson> {
    prop_oneof![
        3 => when(),
        1 => date().prop_map(|d| Bson::String(d.try_to_rfc3339_string().unwrap_or_default())),
        1 => date().prop_map(|d| Bson::Int64(d.timestamp_millis())),
    ]
    .boxed()
}

/// Money as the monolith keeps it: a decimal string; legacy doubles and integers too.
fn money() -> S<Bson> {
    prop_oneof![
        6 => s(decimal_text()),
        1 => (0.0..5000.0f64).prop_map(|x| Bson::Double((x * 100.0).round() / 100.0)),
        1 => (0..5000i32).prop_map(Bson::Int32),
    ]
    .boxed()
}

fn strings() -> S<Bson> {
    vec(text(), 0..4).prop_map(|v| Bson::Array(v.into_iter().map(Bson::String).collect())).boxed()
}

/// A document from `(field, value)` strategies; absent values leave the field out. An unread
/// field of any type is added too.
fn doc(fields: Vec<(&'static str, S<Option<Bson>>)>) -> S<Document> {
    let (names, values): (Vec<&'static str>, Vec<S<Option<Bson>>>) = fields.into_iter().unzip();
    (values, proptest::option::of(hostile()))
        .prop_map(move |(values, extra)| {
            let mut d: Document = names.iter().zip(values).filter_map(|(n, v)| v.map(|v| (n.to_string(), v))).collect();
            if let Some(extra) = extra {
                d.insert("__legacy", extra);
            }
            d
        })
        .boxed()
}

fn sub(fields: Vec<(&'static str, S<Option<Bson>>)>) -> S<Bson> {
    doc(fields).prop_map(Bson::Document).boxed()
}

fn array_of(element: S<Bson>, max: usize) -> S<Bson> {
    vec(element, 0..max).prop_map(Bson::Array).boxed()
}

/// Element ids from a small pool, so some repeat.
fn element_id() -> S<Bson> {
    pick(&["P1", "P2", "P3", "m1", "m2", "m3", "x"])
}

fn oid() -> S<Option<Bson>> {
    any::<[u8; 12]>().prop_map(|b| Some(Bson::ObjectId(ObjectId::from_bytes(b)))).boxed()
}

// ---- the monolith's collections ----

fn customer() -> S<Document> {
    let purchase = sub(vec![
        ("id", sure(element_id())),
        ("product_id", f(s("SKU-[0-9]{3}".boxed()))),
        ("product_name", f(s(text()))),
        ("amount", f(money())),
        ("currency", f(pick(&["THB", "USD"]))),
        ("date", f(when())),
        ("status", f(pick(&["paid", "refunded", "pending"]))),
        ("gateway", f(s(text()))),
    ]);
    doc(vec![
        ("_id", oid()),
        ("user_id", sure(s("U[0-9a-f]{6}".boxed()))),
        ("name", f(s(text()))),
        ("lang", f(pick(&["en", "th"]))),
        ("tz", f(s(text()))),
        ("country", f(pick(&["TH", "SG", "US"]))),
        ("prefs", f(strings())),
        ("interests", f(strings())),
        ("tier", f(pick(&["basic", "premium", "vip"]))),
        ("ltv", f(money())),
        (
            "stats",
            f(sub(vec![
                ("msgs", f(int(500))),
                ("sessions", f(int(50))),
                ("avg_session_sec", f(double())),
                ("last_seen", f(when())),
                ("joined", f(when())),
                ("score", f(double())),
            ])),
        ),
        ("purchases", f(array_of(purchase, 4))),
        ("created_at", f(when())),
        ("updated_at", f(when())),
    ])
}

fn conversation() -> S<Document> {
    let message = sub(vec![
        ("id", sure(element_id())),
        ("from", f(pick(&["user", "bot", "system", "assistant", "agent"]))),
        ("text", f(s(text()))),
        ("ts", f(when())),
        ("intent", f(s(text()))),
        ("sentiment", f(pick(&["positive", "neutral", "negative"]))),
        ("confidence", f(double())),
        ("channel_msg_id", f(s(text()))),
    ]);
    doc(vec![
        ("_id", oid()),
        ("user_id", f(s("U[0-9a-f]{6}".boxed()))),
        ("user_name", f(s(text()))),
        ("state", f(pick(&["active", "ended", "paused"]))),
        ("lang", f(pick(&["en", "th"]))),
        ("messages", f(array_of(message, 4))),
        (
            "ai",
            f(sub(vec![
                ("provider", f(pick(&["deepSeek", "openRouter"]))),
                ("session_id", sure(s("S-[0-9]{4}".boxed()))),
                ("tokens", f(int(50_000))),
                ("avg_ms", f(double())),
                ("success_rate", f(double())),
            ])),
        ),
        ("started_at", f(when())),
        ("last_activity", f(when())),
        ("meta", f(free())),
        ("created_at", f(when())),
        ("updated_at", f(when())),
    ])
}

fn product() -> S<Document> {
    doc(vec![
        ("_id", oid()),
        ("sku", sure(s("SKU-[0-9]{4}".boxed()))),
        ("name_en", f(s(text()))),
        ("name_th", f(s(text()))),
        ("desc_en", f(s(text()))),
        ("desc_th", f(s(text()))),
        ("price", f(money())),
        ("currency", f(pick(&["THB"]))),
        ("category", f(pick(&["supplements", "skincare", ""]))),
        ("subcategory", f(pick(&["daily", "kids"]))),
        ("images", f(strings())),
        ("specs", f(free())),
        ("specs_th", f(free())),
        ("stock", f(int(200))),
        ("reorder_at", f(int(20))),
        ("tags", f(strings())),
        ("search_terms", f(strings())),
        ("views", f(int(10_000))),
        ("sold", f(int(500))),
        ("rating", f(double())),
        ("reviews", f(int(300))),
        ("status", f(pick(&["active", "discontinued", "out_of_stock"]))),
        ("created_at", f(when())),
        ("updated_at", f(when())),
    ])
}

fn cache_entry() -> S<Document> {
    let ai = sub(vec![
        ("session_id", f(s(text()))),
        ("user_id", f(s(text()))),
        ("provider", f(pick(&["deepSeek", "openRouter"]))),
        ("prompt", f(s(text()))),
        ("response", f(s(text()))),
        ("tokens", f(prop_oneof![3 => int(2000), 1 => s("[0-9]{1,4}".boxed())].boxed())),
        ("ms", f(int(5000))),
        ("confidence", f(double())),
        ("intent", f(s(text()))),
        ("entities", f(strings())),
        ("model_version", f(s(text()))),
    ]);
    let result = sub(vec![
        ("title", f(s(text()))),
        ("url", sure(pick(&["https://a.example/1", "https://a.example/2", "https://b.example/x"]))),
        ("summary", f(s(text()))),
        ("source", f(s(text()))),
        ("relevance", f(prop_oneof![3 => double(), 1 => s("0\\.[0-9]{2}".boxed())].boxed())),
        ("updated", f(when())),
        ("rank", f(int(10))),
    ]);
    let research = sub(vec![
        ("query", f(s(text()))),
        ("lang", f(pick(&["en", "th"]))),
        ("results", f(array_of(result, 4))),
        ("search_ms", f(int(900))),
        ("total", f(int(50))),
    ]);
    doc(vec![
        ("_id", oid()),
        ("key", sure(s("cache:[0-9]{4}".boxed()))),
        ("kind", sure(prop_oneof![5 => pick(&["ai_response", "research"]), 1 => pick(&["other"])].boxed())),
        ("expires_at", f(legacy_date())),
        ("created_at", f(when())),
        ("value", f(prop_oneof![ai, research].boxed())),
    ])
}

fn log() -> S<Document> {
    let webhook = sub(vec![
        ("event_id", f(s(text()))),
        ("event_type", f(s(text()))),
        ("user_id", f(s(text()))),
        ("payload", f(free())),
        ("status", f(s(text()))),
        ("processing_ms", f(int(200))),
    ]);
    let audit = sub(vec![
        ("user_id", f(s(text()))),
        ("action", f(s(text()))),
        ("resource", f(s(text()))),
        ("result", f(pick(&["success", "failure"]))),
        ("details", f(free())),
        ("ip", f(s(text()))),
        ("user_agent", f(s(text()))),
    ]);
    let security = sub(vec![
        ("event_type", f(s(text()))),
        ("identifier", f(s(text()))),
        ("ip", f(s(text()))),
        ("user_agent", f(s(text()))),
        ("resource", f(s(text()))),
        ("details", f(free())),
        ("severity", f(pick(&["low", "medium", "high", "critical"]))),
    ]);
    doc(vec![
        ("_id", oid()),
        ("kind", sure(pick(&["webhook", "audit", "security"]))),
        ("ts", f(legacy_date())),
        ("service", f(s(text()))),
        ("correlation_id", f(s(text()))),
        ("data", f(prop_oneof![webhook, audit, security].boxed())),
    ])
}

fn metric() -> S<Document> {
    let error_type = sub(vec![("type", f(s(text()))), ("count", f(int(10))), ("first_seen", f(when()))]);
    let provider_values = sub(vec![
        ("calls", f(int(1000))),
        ("success", f(int(1000))),
        ("failures", f(int(20))),
        ("avg_response_time", f(double())),
        ("total_tokens", f(int(100_000))),
        ("error_types", f(array_of(error_type, 3))),
    ]);
    doc(vec![
        ("_id", oid()),
        ("kind", sure(pick(&["system", "provider"]))),
        ("ts", f(when())),
        ("period", f(pick(&["1m", "5m", "1h", "1d"]))),
        ("service", f(s(text()))),
        ("provider", f(pick(&["deepSeek", "openRouter"]))),
        ("values", f(prop_oneof![free(), provider_values].boxed())),
    ])
}

fn api_key() -> S<Document> {
    doc(vec![
        ("_id", oid()),
        ("key_id", sure(s("K[0-9]{4}".boxed()))),
        ("key_hash", f(s("sha256:[0-9a-f]{8}".boxed()))),
        ("name", f(s(text()))),
        ("user_id", f(s(text()))),
        ("perms", f(strings())),
        ("scope", f(pick(&["admin", "user", "service"]))),
        (
            "rate",
            f(sub(vec![
                ("requests", f(prop_oneof![3 => int(1000), 1 => s("[0-9]{1,3}".boxed())].boxed())),
                ("window_sec", f(int(3600))),
            ])),
        ),
        ("usage", f(sub(vec![("total", f(int(10_000))), ("last_used", f(when())), ("month", f(int(1000)))]))),
        ("status", f(pick(&["active", "suspended", "revoked"]))),
        ("expires_at", f(when())),
        ("created_at", f(when())),
        ("updated_at", f(when())),
        ("raw_key", f(s(text()))),
    ])
}

fn knowledge() -> S<Document> {
    let source = sub(vec![
        ("title", f(s(text()))),
        ("url", sure(pick(&["https://who.int/x", "https://nih.gov/y", "https://efsa.eu/z"]))),
        ("authority", f(s(text()))),
        ("published", f(when())),
        ("doi", f(s(text()))),
    ]);
    doc(vec![
        ("_id", oid()),
        ("topic_id", sure(s("T[0-9]{4}".boxed()))),
        ("name", f(s(text()))),
        ("category", f(s(text()))),
        ("overview", f(s(text()))),
        ("key_points", f(strings())),
        ("recommendations", f(strings())),
        ("warnings", f(strings())),
        ("sources", f(array_of(source, 4))),
        ("th", f(free())),
        ("updated_at", f(when())),
    ])
}

/// Runs the laws of every service that reads `collection` on generated documents.
fn laws_hold(collection: &str, documents: S<Document>, cases: u32) {
    let (topics, services) = shipped();
    let readers: Vec<&ServiceTransforms> = services
        .iter()
        .filter(|s| {
            s.collections().iter().any(|c| s.reverse_for(c).is_some_and(|r| r.source_collection() == collection))
        })
        .collect();
    assert!(!readers.is_empty(), "no service writes {collection} back");
    let (checked, rejected, edits) = (Cell::new(0u32), Cell::new(0u32), Cell::new(0u64));
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let result = runner.run(&documents, |doc| {
        let mut any = false;
        for svc in &readers {
            let report = check_laws(svc, &topics, "linechatbot", [(collection.to_string(), doc.clone())]);
            prop_assert!(report.ok(), "{}", report.render(3));
            for t in report.tallies.values() {
                any |= t.documents > 0;
                rejected.set(rejected.get() + u32::try_from(t.rejected).unwrap_or(0));
                edits.set(edits.get() + t.put_get);
            }
        }
        if any {
            checked.set(checked.get() + 1);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{collection}: {e}");
    }
    // The property must not hold by rejection: most documents reach a target and are checked.
    println!(
        "{collection}: {} of {cases} documents checked, {} rejections, {} edits",
        checked.get(),
        rejected.get(),
        edits.get()
    );
    assert!(checked.get() * 2 > cases, "{collection}: only {} of {cases} documents were checked", checked.get());
    assert!(edits.get() > u64::from(cases), "{collection}: only {} edits", edits.get());
}

/// Cases per collection; `FICUS_LENS_CASES=5000` for a deeper run.
fn cases() -> u32 {
    std::env::var("FICUS_LENS_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(96)
}

#[test]
fn customers() {
    laws_hold("customers", customer(), cases());
}

#[test]
fn conversations() {
    laws_hold("conversations", conversation(), cases());
}

#[test]
fn products() {
    laws_hold("products", product(), cases());
}

#[test]
fn cache_entries() {
    laws_hold("cache_entries", cache_entry(), cases());
}

#[test]
fn logs() {
    laws_hold("logs", log(), cases());
}

#[test]
fn metrics() {
    laws_hold("metrics", metric(), cases());
}

#[test]
fn api_keys() {
    laws_hold("api_keys", api_key(), cases());
}

#[test]
fn knowledge_topics() {
    laws_hold("knowledge", knowledge(), cases());
}
