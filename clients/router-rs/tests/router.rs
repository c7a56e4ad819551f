//! The Router with fixed instants: a refused body keeps the old view until it ages out into
//! holds; a write failure forces a re-read; fences hold; crossing answers keep the later read;
//! errors say what and where. No test depends on timing: every instant is given.

use std::time::{Duration, Instant};

use ficus_router::{Hold, Key, Route, RouteError, Router, ViewError, url};

const SECOND: Duration = Duration::from_secs(1);

fn body(percent: u8, epoch: i64, fenced: &str) -> String {
    format!(
        r#"{{"services":[{{"service":"customers_db","percent":{percent},"epoch":{epoch},"phase":"stable","fenced":{fenced},"canFlip":false,"canRollback":true,"forwardLag":0,"reverseLag":null,"somethingNew":[1]}}]}}"#
    )
}

/// `k-203` has bucket 3 (see vectors.json).
const KEY: Key<'static> = Key::Text("k-203");

#[test]
fn a_refused_body_keeps_the_old_view_until_it_ages_out() {
    let t0 = Instant::now();
    let mut r = Router::new(10 * SECOND);
    assert!(r.needs_refresh(t0));
    assert_eq!(r.route("customers_db", KEY, t0).unwrap().route, Route::Hold(Hold::NoView));

    r.observe(&body(10, 4, "null"), t0).unwrap();
    assert!(!r.needs_refresh(t0 + 4 * SECOND));
    assert!(r.needs_refresh(t0 + 5 * SECOND), "read again at half the max age");
    let d = r.route("customers_db", KEY, t0).unwrap();
    assert_eq!((d.route, d.bucket, d.epoch), (Route::Service, 3, Some(4)));

    for bad in ["<html>503</html>", r#"{"services":[{"service":"customers_db","percent":0,"epoch":5}]}"#] {
        assert!(r.observe(bad, t0 + SECOND).is_err());
    }
    assert_eq!(r.route("customers_db", KEY, t0 + 10 * SECOND).unwrap().route, Route::Service);
    let held = r.route("customers_db", KEY, t0 + 10 * SECOND + Duration::from_millis(1)).unwrap();
    assert_eq!(held.route, Route::Hold(Hold::Stale { age: Duration::from_millis(10_001), max_age: 10 * SECOND }));
    assert_eq!(held.epoch, None);
    assert_eq!(held.reason().unwrap(), "no fresh view: the last one is 10001 ms old (at most 10000 ms)");

    r.observe(&body(0, 5, "null"), t0 + 11 * SECOND).unwrap();
    let d = r.route("customers_db", KEY, t0 + 11 * SECOND).unwrap();
    assert_eq!((d.route, d.epoch), (Route::Monolith, Some(5)));
}

#[test]
fn write_failed_forces_a_reread_and_holds_until_it() {
    let t0 = Instant::now();
    let mut r = Router::new(10 * SECOND);
    r.observe(&body(10, 4, "null"), t0).unwrap();
    r.write_failed();
    assert!(r.needs_refresh(t0));
    let d = r.route("customers_db", KEY, t0).unwrap();
    assert_eq!((d.route.clone(), d.epoch), (Route::Hold(Hold::RereadAfterFailedWrite), None));
    assert!(d.reason().unwrap().contains("re-reading it after a failed write"));
    // A refused body is no re-read.
    assert!(r.observe("", t0 + SECOND).is_err());
    assert!(r.needs_refresh(t0 + SECOND));
    r.observe(&body(10, 4, "null"), t0 + SECOND).unwrap();
    assert!(!r.needs_refresh(t0 + SECOND));
    assert_eq!(r.route("customers_db", KEY, t0 + SECOND).unwrap().route, Route::Service);
}

#[test]
fn a_fence_holds_until_a_view_without_it() {
    let t0 = Instant::now();
    let mut r = Router::default();
    r.observe(&body(0, 5, r#"{"from":0,"to":10,"epoch":5,"losing":"monolith","drain":{"state":"not_yet"}}"#), t0)
        .unwrap();
    let d = r.route("customers_db", KEY, t0).unwrap();
    assert_eq!((d.route.clone(), d.epoch), (Route::Hold(Hold::Fenced { from: 0, to: 10, epoch: 5 }), Some(5)));
    assert_eq!(d.reason().unwrap(), "fenced: buckets [0, 10) are moving (epoch 5); queue the write or retry shortly");
    assert_eq!(r.route("customers_db", Key::Text("k-22"), t0).unwrap().route, Route::Monolith); // bucket 50
    r.observe(&body(10, 6, "null"), t0 + SECOND).unwrap();
    assert_eq!(r.route("customers_db", KEY, t0 + SECOND).unwrap().route, Route::Service);
}

#[test]
fn of_two_answers_that_cross_the_later_read_is_kept() {
    let t0 = Instant::now();
    let mut r = Router::default();
    r.observe(&body(50, 8, "null"), t0 + SECOND).unwrap();
    r.observe(&body(10, 7, "null"), t0).unwrap(); // sent earlier, answered later
    assert_eq!(r.view().unwrap().services[0].epoch, 8);
}

#[test]
fn errors_say_what_and_where() {
    let t0 = Instant::now();
    let mut r = Router::default();
    r.observe(&body(10, 4, "null"), t0).unwrap();
    let e = r.route("orders_db", KEY, t0).unwrap_err();
    assert!(matches!(&e, RouteError::UnknownService { service, .. } if service == "orders_db"));
    assert_eq!(e.to_string(), r#"ficus router: the view lists no service "orders_db" (it lists "customers_db")"#);

    let e = r.route("customers_db", Key::ObjectIdHex("65a1b2c3"), t0).unwrap_err();
    assert_eq!(e.to_string(), r#"ficus router: key "65a1b2c3" is no ObjectId: an ObjectId's hex is 24 hex digits"#);
    assert!(Key::ObjectIdHex("zz5a1b2c3d4e5f60718293a4b").bucket().is_err());
    assert!(Key::ObjectIdHex("ｆ5a1b2c3d4e5f60718293a4").bucket().is_err()); // 24 chars, not 24 hex digits
    // A bad key is an error even with no view to route by.
    assert!(Router::default().route("customers_db", Key::ObjectIdHex(""), t0).is_err());
    assert_eq!(Key::ObjectIdHex("65A1B2C3D4E5F60718293A4B").bucket(), Ok(11));

    let e = r.observe(r#"{"services":[{"service":"a","percent":101,"epoch":1,"fenced":null}]}"#, t0).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"ficus router: the /cutover body is not a view: service "a": percent 101 is above 100"#
    );
    let e = r.observe(r#"{"services":[{"service":"a","percent":1,"epoch":1}]}"#, t0).unwrap_err();
    assert!(matches!(e, ViewError::Json(_)));
    assert!(e.to_string().contains("missing field `fenced`"), "{e}");
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn the_url_names_the_instance_encoded() {
    assert_eq!(url("http://ficus:9464/", "pod a/b?&"), "http://ficus:9464/cutover?instance=pod%20a%2Fb%3F%26");
    assert_eq!(Router::url("http://ficus:9464", "web-1:42"), "http://ficus:9464/cutover?instance=web-1%3A42");
    assert_eq!(url("http://f", "ユ~._-"), "http://f/cutover?instance=%E3%83%A6~._-");
}
