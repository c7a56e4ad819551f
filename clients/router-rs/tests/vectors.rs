//! Checks the Rust router against `clients/vectors.json`, written by an independent
//! implementation (`clients/gen_vectors.py`): every key's bucket, every decision, and which
//! bodies are a view. Run: `cargo test --manifest-path clients/router-rs/Cargo.toml`.

use std::time::Duration;

use ficus_router::{DEFAULT_MAX_AGE, Key, RouteError, View, decide};
use serde_json::Value;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../vectors.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_else(|| panic!("{field} in {v}"))
}

/// A vector's key as a `Key` (an int's decimal string parsed, so no float is in the way).
fn with_key<T>(k: &Value, f: impl FnOnce(Key<'_>) -> T) -> T {
    let value = str_of(k, "value");
    match str_of(k, "kind") {
        "text" => f(Key::Text(value)),
        "objectid" => f(Key::ObjectIdHex(value)),
        "int" => f(Key::Int(value.parse().unwrap())),
        other => panic!("unknown kind {other}"),
    }
}

#[test]
fn the_readme_worked_examples() {
    assert_eq!(ficus_router::bucket("U4af4980629c1e3f2b7d5a8e9c0f1d2e3"), 62);
    assert_eq!(Key::ObjectIdHex("65a1b2c3d4e5f60718293a4b").bucket(), Ok(11));
    assert_eq!(Key::Int(42).bucket(), Ok(37));
}

#[test]
fn every_key_vector_has_its_bucket() {
    let v = vectors();
    let keys = v["keys"].as_array().unwrap();
    assert!(keys.len() >= 200);
    for k in keys {
        let want = k["bucket"].as_u64().unwrap() as u8;
        assert_eq!(with_key(k, |key| key.bucket()), Ok(want), "{k}");
    }
}

#[test]
fn every_decision_vector() {
    let v = vectors();
    assert_eq!(v["defaultMaxAgeMs"].as_u64(), Some(DEFAULT_MAX_AGE.as_millis() as u64));
    for d in v["decisions"].as_array().unwrap() {
        let name = str_of(d, "name");
        let view = (!d["view"].is_null()).then(|| View::parse(&d["view"].to_string()).expect(name));
        let age = Duration::from_millis(d["ageMs"].as_u64().unwrap());
        let max_age = d["maxAgeMs"].as_u64().map_or(DEFAULT_MAX_AGE, Duration::from_millis);
        let got =
            with_key(&d["key"], |key| decide(view.as_ref().map(|v| (v, age)), max_age, str_of(d, "service"), key));
        match str_of(d, "expect") {
            "error" => assert!(matches!(got, Err(RouteError::UnknownService { .. })), "{name}: {got:?}"),
            expect => {
                let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(got.route.name(), expect, "{name}");
                assert_eq!(u64::from(got.bucket), d["bucket"].as_u64().unwrap(), "{name}");
                assert_eq!(got.epoch, d["epoch"].as_i64(), "{name}");
                assert_eq!(got.reason().is_some(), expect == "hold", "{name}");
            }
        }
    }
}

#[test]
fn bodies_that_are_no_view_are_refused_and_views_are_taken() {
    let v = vectors();
    for b in v["badViews"].as_array().unwrap() {
        assert!(View::parse(str_of(b, "body")).is_err(), "{} was taken", str_of(b, "name"));
    }
    for g in v["goodViews"].as_array().unwrap() {
        if let Err(e) = View::parse(str_of(g, "body")) {
            panic!("{}: {e}", str_of(g, "name"));
        }
    }
}
