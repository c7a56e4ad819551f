//! The routers applications embed (`clients/router-rs`, `clients/router-js`) against a running
//! ficus (issue 21): each reads `GET /cutover` with its instance id, and routes every customer's
//! key as ficus itself judges ownership, before a move, while its buckets are fenced (held) and
//! after the flip. The JavaScript router runs under a real Node.js; one of its instances waits
//! (`whenWritable`) on a fenced key and is released by the flip. The fence waits for the
//! instances that read it, so both routers' reads are what lets the move go on.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bson::{Document, doc};
use common::{World, eventually};
use ficus::cutover::route;
use ficus::testkit::workload::Workload;
use ficus_router::{Key, Route, Router};

const SERVICE: &str = "customers_db";
const CUSTOMERS: u64 = 40;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn node() -> String {
    std::env::var("FICUS_NODE").unwrap_or_else(|_| "node".into())
}

/// The JavaScript router's decisions for `keys`, read once from ficus at `port` as `instance`.
fn js_routes(port: u16, instance: &str, keys: &[String]) -> Vec<String> {
    let module = common::repo_root().join("clients/router-js/index.mjs");
    let script = format!(
        "import {{ Router }} from {module:?};
         const r = new Router({{ url: 'http://127.0.0.1:{port}', instance: {instance:?} }});
         if (!(await r.refresh())) {{ console.error(String(r.lastError)); process.exit(2); }}
         const keys = JSON.parse(process.argv[1]);
         console.log(JSON.stringify(keys.map((k) => r.route({SERVICE:?}, k).route)));",
        module = module.display().to_string()
    );
    let out = Command::new(node())
        .args(["--input-type=module", "-e", &script, &serde_json::to_string(keys).unwrap()])
        .output()
        .expect("node (Debian's nodejs) runs");
    assert!(out.status.success(), "the JavaScript router: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// The Rust router's decisions for `keys`, from one read of ficus at `port` as `instance`.
fn rs_routes(port: u16, instance: &str, keys: &[String]) -> Vec<String> {
    let mut router = Router::new(Duration::from_secs(10));
    let sent = Instant::now();
    let (code, body) = common::http_get(port, &format!("/cutover?instance={instance}"));
    assert_eq!(code, 200, "{body}");
    router.observe(&body, sent).unwrap_or_else(|e| panic!("{e}: {body}"));
    keys.iter().map(|k| router.route(SERVICE, Key::Text(k), Instant::now()).unwrap().route.name().to_string()).collect()
}

/// What ficus's own ownership says of each key at `percent`, fenced `[from, to)` held.
fn expected(keys: &[String], percent: u8, fenced: Option<(u8, u8)>) -> Vec<String> {
    keys.iter()
        .map(|k| {
            let b = route::bucket(k);
            let route = match fenced {
                Some((from, to)) if b >= from && b < to => "hold",
                _ if route::owns(percent, b) => Route::Service.name(),
                _ => Route::Monolith.name(),
            };
            route.to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn both_routers_route_as_ficus_owns_before_during_and_after_a_move() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    client
        .database("admin")
        .run_command(doc! { "setParameter": 1, "transactionLifetimeLimitSeconds": 5 })
        .await
        .unwrap();
    let config = world.dir.path().join("ficus.toml");
    std::fs::write(&config, "[cutover]\ntransaction_lifetime_secs = 5\nview_max_age_secs = 5\n").unwrap();
    let env = [("FICUS_CONFIG", config.to_str().unwrap())];
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let mut w = Workload::new(CUSTOMERS);
    for i in 0..CUSTOMERS {
        monolith.insert_one(w.customer(i)).await.unwrap();
    }
    let keys: Vec<String> = (0..CUSTOMERS).map(Workload::user_id).collect();
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut ficus = world.spawn_ficus(&["run", "--service", SERVICE, "--metrics-addr", &addr], &env);
    // The routers do not wait for ficus: until it serves a view they have none (503), and hold.
    eventually("ficus serves /cutover", Duration::from_secs(120), || async {
        common::try_http_get(port, "/cutover").is_ok_and(|(code, _)| code == 200)
    })
    .await;
    let service = client.database(SERVICE).collection::<Document>("customers");
    eventually("customers_db populated", Duration::from_secs(120), || async {
        service.count_documents(doc! {}).await.unwrap() == CUSTOMERS
    })
    .await;
    let at_zero = expected(&keys, 0, None);
    assert!(at_zero.iter().all(|r| r == "monolith"));
    assert_eq!(rs_routes(port, "rs-app", &keys), at_zero);
    assert_eq!(js_routes(port, "js-app", &keys), at_zero);

    // A move to 50% stopped once its buckets are fenced: both hold the fenced keys.
    let until = world.ficus(&["cutover", "--service", SERVICE, "--to", "50", "--until", "fence"], &env);
    assert!(until.status.success(), "{}", text(&until));
    assert!(text(&until).contains("acknowledged by"), "{}", text(&until));
    let fenced = expected(&keys, 0, Some((0, 50)));
    assert!(fenced.iter().any(|r| r == "hold") && fenced.iter().any(|r| r == "monolith"));
    assert_eq!(rs_routes(port, "rs-app", &keys), fenced);
    assert_eq!(js_routes(port, "js-app", &keys), fenced);

    // An application waiting on a fenced key is released by the flip.
    let held = keys.iter().find(|k| route::bucket(k) < 50).unwrap().clone();
    let module = common::repo_root().join("clients/router-js/index.mjs");
    let wait = format!(
        "import {{ Router }} from {:?};
         const r = new Router({{ url: 'http://127.0.0.1:{port}', instance: 'js-waiter', refreshMs: 500, maxAgeMs: 5000 }});
         const d = await r.whenWritable({SERVICE:?}, {held:?}, {{ timeoutMs: 240000 }});
         console.log(JSON.stringify(d));",
        module.display().to_string()
    );
    let waiter = Command::new(node())
        .args(["--input-type=module", "-e", &wait])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let done = world.ficus(&["cutover", "--service", SERVICE, "--to", "50", "--timeout", "120"], &env);
    assert!(done.status.success(), "{}\n{}", text(&done), ficus.logs());
    let out = tokio::task::spawn_blocking(move || waiter.wait_with_output().unwrap()).await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["route"], "service", "{d}");

    let after = expected(&keys, 50, None);
    assert!(after.iter().any(|r| r == "service") && after.iter().any(|r| r == "monolith"));
    assert_eq!(rs_routes(port, "rs-app", &keys), after);
    assert_eq!(js_routes(port, "js-app", &keys), after);
    // ficus recorded each instance's view (how the fence knew they held).
    let views: Vec<String> = client
        .database("ficus")
        .collection::<Document>("views")
        .distinct("_id", doc! {})
        .await
        .unwrap()
        .into_iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    for instance in ["rs-app", "js-app", "js-waiter"] {
        assert!(views.iter().any(|v| v.contains(instance)), "{instance} not among {views:?}");
    }
    assert!(ficus.terminate().success(), "{}", ficus.logs());
}
