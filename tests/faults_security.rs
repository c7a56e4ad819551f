//! Security, end to end: the monolith, the services and the store behind SCRAM-SHA-256 and
//! behind TLS, with the pipeline working, passwords printed nowhere, and a wrong password or an
//! untrusted certificate refused loudly. Each scenario runs a seeded workload in its own world
//! and ends with the audit of `tests/common/scenario` (nothing lost, one line per scenario), as
//! in the other fault families (README, "Faults, and what the tests prove").

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bson::{Document, doc};
use common::free_port;
use common::scenario::{ALL, Setup, TAIL, mongo_client, plain, stop_cleanly, tail_of, text};

/// A plain HTTP GET: the body.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// The monolith, the services and the store behind SCRAM-SHA-256 (`secantusd-rs --auth`, the
/// first user created through the localhost exception). The pipeline works with credentials in
/// the URIs, and the password shows up nowhere: not in logs, errors, `/metrics`, `ficus status`
/// or `ficus validate`. A wrong password stops ficus with an authentication error.
#[tokio::test(flavor = "multi_thread")]
async fn scram_authentication_works_and_credentials_never_leak() {
    let mut s = Setup::seeded("security-scram").mongo(&["--auth"]).topics_by_hand().start().await;
    const SECRET: &str = "Zq7-hunter2@x:y/z";
    const ENCODED: &str = "Zq7-hunter2%40x%3Ay%2Fz";
    const FRAGMENT: &str = "Zq7-hunter2";
    let anonymous = s.source.clone();
    anonymous
        .database("admin")
        .run_command(doc! { "createUser": "ficus", "pwd": SECRET, "roles": [{ "role": "root", "db": "admin" }] })
        .await
        .expect("the localhost exception lets the first user be created");
    let uri =
        format!("mongodb://ficus:{ENCODED}@127.0.0.1:{}/?directConnection=true&authSource=admin", s.world.mongo.port);
    let client = mongo_client(&uri).await;
    (s.source, s.target) = (client.clone(), client);
    assert!(
        anonymous.database("linechatbot").collection::<Document>("products").count_documents(doc! {}).await.is_err(),
        "the server must refuse unauthenticated commands"
    );
    let metrics_port = free_port();
    s.env = s.env.clone().with("FICUS_SOURCE_URI", &uri).with("FICUS_TARGET_URI", &uri).with("FICUS_STORE_URI", &uri);
    let env = s.env.clone();
    let mut outputs: Vec<(String, String)> = Vec::new();
    let out = s.run(&["topics", "apply"]);
    assert!(out.status.success(), "topics apply with credentials:\n{}", text(&out));
    outputs.push(("topics apply".into(), text(&out)));

    let mut driver = s.driver();
    driver.seed(80, 40).await;
    let args: Vec<String> = ALL
        .iter()
        .map(|a| a.to_string())
        .chain(["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")])
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut f = s.spawn(&args);
    s.wait_streaming().await;
    let driver = driver.run(200, Duration::from_millis(10)).await;
    let mut report = s.audit(&driver.log).run().await;
    outputs.push(("/metrics".into(), http_get(metrics_port, "/metrics")));
    outputs.push(("/readyz".into(), http_get(metrics_port, "/readyz")));
    for cmd in [&["status"][..], &["validate"][..]] {
        let out = s.run(cmd);
        outputs.push((format!("ficus {}", cmd.join(" ")), text(&out)));
    }
    // Errors that carry a URI: an unreachable host, with the password in the URI.
    let unreachable =
        format!("mongodb://ficus:{ENCODED}@127.0.0.1:1/?directConnection=true&serverSelectionTimeoutMS=500");
    let out = s.run_with(
        &["verify", "--checks", "counts,contents", "--service", "products_db"],
        &env.clone().with("FICUS_SOURCE_URI", &unreachable),
    );
    outputs.push(("verify against an unreachable source".into(), text(&out)));
    let bad_db = env.clone().with("FICUS_SOURCE_DB", "no.dots.allowed").with("FICUS_SOURCE_URI", &unreachable);
    outputs.push(("validate with a bad source.db".into(), text(&s.run_with(&["validate"], &bad_db))));

    // A wrong password: an authentication error that stops ficus (no retry loop), and the wrong
    // password is not printed either.
    let wrong = format!(
        "mongodb://ficus:Wr0ng-Xy9secret@127.0.0.1:{}/?directConnection=true&authSource=admin",
        s.world.mongo.port
    );
    let bad =
        env.clone().with("FICUS_SOURCE_URI", &wrong).with("FICUS_TARGET_URI", &wrong).with("FICUS_STORE_URI", &wrong);
    let mut w = s.spawn_with(TAIL, &bad);
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| w.wait(Duration::from_secs(90)));
    let wrong_logs = plain(&w.logs());
    outputs.push(("run with a wrong password".into(), wrong_logs.clone()));
    match status {
        None => report.problems.push(format!(
            "a wrong password did not stop ficus within 90 s (it should be fatal, as the README says):\n{}",
            tail_of(&wrong_logs, 10)
        )),
        Some(s) if s.success() => report.problems.push("a wrong password exited 0".into()),
        Some(_) if !wrong_logs.to_lowercase().contains("auth") => {
            report.problems.push(format!("the error does not say authentication failed:\n{}", tail_of(&wrong_logs, 10)))
        }
        Some(_) => {}
    }
    let took = started.elapsed();

    report.finish(&mut f, "ficus");
    for entry in std::fs::read_dir(s.world.dir.path()).unwrap().flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        if n.starts_with("ficus-") && n.ends_with(".log") {
            outputs.push((n, std::fs::read_to_string(entry.path()).unwrap_or_default()));
        }
    }
    let checked = outputs.len();
    for (what, out) in &outputs {
        for needle in [FRAGMENT, ENCODED, SECRET, "Xy9secret"] {
            if out.contains(needle) {
                let line = out.lines().find(|l| l.contains(needle)).unwrap_or_default();
                report.problems.push(format!(
                    "{what} prints a password ({needle}): {}",
                    line.chars().take(300).collect::<String>()
                ));
            }
        }
    }
    report.note = format!(
        "seed {}; password absent from {checked} outputs (logs, /metrics, status, validate, errors); wrong password: exit {:?} after {:.1}s",
        s.seed,
        status.and_then(|st| st.code()),
        took.as_secs_f64()
    );
    report.check();
}

/// Writes a throwaway CA and a server certificate for 127.0.0.1/localhost with `openssl`.
fn throwaway_pki(dir: &Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").current_dir(dir).args(args).output().expect("the openssl CLI");
        assert!(out.status.success(), "openssl {args:?}:\n{}", text(&out));
    };
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    for ca in ["ca", "other-ca"] {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=ficus {ca}"),
        ]);
    }
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
}

/// The monolith, services and store over TLS (a throwaway CA): the pipeline works with
/// `tls=true&tlsCAFile=…`; a server certificate from another CA is refused, loudly.
#[tokio::test(flavor = "multi_thread")]
async fn tls_to_mongodb_works_and_an_untrusted_certificate_is_refused() {
    let pki = tempfile::tempdir().unwrap();
    throwaway_pki(pki.path());
    let file = |n: &str| pki.path().join(n).to_str().unwrap().to_string();
    let (cert, key) = (file("server.pem"), file("server.key"));
    let tls = ["--tls-cert-file", &cert, "--tls-key-file", &key];
    let mut s = Setup::seeded("security-tls").mongo(&tls).topics_by_hand().start().await;
    let port = s.world.mongo.port;
    let uri = |ca: &str| format!("mongodb://127.0.0.1:{port}/?directConnection=true&tls=true&tlsCAFile={}", file(ca));
    let client = mongo_client(&uri("ca.pem")).await;
    (s.source, s.target) = (client.clone(), client.clone());
    s.env = s
        .env
        .clone()
        .with("FICUS_SOURCE_URI", uri("ca.pem"))
        .with("FICUS_TARGET_URI", uri("ca.pem"))
        .with("FICUS_STORE_URI", uri("ca.pem"));
    let out = s.run(&["topics", "apply"]);
    assert!(out.status.success(), "topics apply over TLS:\n{}", text(&out));
    let mut driver = s.driver();
    driver.seed(80, 40).await;
    let mut f = s.spawn(ALL);
    s.wait_streaming().await;
    let driver = driver.run(200, Duration::from_millis(10)).await;
    let mut report = s.audit(&driver.log).run().await;
    stop_cleanly(&mut f, "ficus");

    // A certificate this CA file does not vouch for: no connection, and the reason in the log.
    let other = s
        .env
        .clone()
        .with("FICUS_SOURCE_URI", uri("other-ca.pem"))
        .with("FICUS_TARGET_URI", uri("other-ca.pem"))
        .with("FICUS_STORE_URI", uri("other-ca.pem"));
    let mut u = s.spawn_with(TAIL, &other);
    let started = Instant::now();
    let mut status = None;
    while started.elapsed() < Duration::from_secs(60) && status.is_none() {
        status = u.wait(Duration::from_millis(500));
        let logs = plain(&u.logs()).to_lowercase();
        if status.is_none()
            && (logs.contains("certificate") || logs.contains("unknownissuer") || logs.contains("tls"))
            && logs.contains("warn")
        {
            break; // reported (and retried)
        }
    }
    let logs = plain(&u.logs());
    let lower = logs.to_lowercase();
    let outcome = match status {
        Some(s) if s.success() => {
            report.problems.push("an untrusted server certificate exited 0".into());
            "exit 0".to_string()
        }
        Some(s) => format!("stopped, exit {:?}", s.code()),
        None => "kept retrying".to_string(),
    };
    if !(lower.contains("certificate") || lower.contains("unknownissuer") || lower.contains("invalid peer")) {
        report.problems.push(format!("an untrusted certificate is not named as the reason:\n{}", tail_of(&logs, 10)));
    }
    if status.is_some()
        && client.database("ficus").collection::<Document>("leases").count_documents(doc! {}).await.is_err()
    {
        report.problems.push("the store became unreadable".into());
    }
    let error = logs
        .lines()
        .find(|l| l.contains("WARN") || l.contains("ERROR"))
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect::<String>();
    report.note = format!(
        "seed {}; untrusted certificate: {outcome} after {:.1}s: {error}",
        s.seed,
        started.elapsed().as_secs_f64()
    );
    report.check();
}
