//! Shared by the bench targets (`benches/pipeline.rs`, `benches/e2e/`): where figures go, the
//! machine they were taken on, and the combined table.
//!
//! Each target writes its own section (`target/bench/pipeline.json`, `target/bench/e2e.json`) and
//! then merges whatever sections exist into `target/bench/ficus-bench.json` and prints the
//! combined table, so `cargo bench` (both targets, e2e first) ends with the whole picture and each
//! target still runs alone.

#![allow(dead_code)] // each bench target uses a different part

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::{Value, json};

/// `target/bench` (or `$CARGO_TARGET_DIR/bench`).
pub fn out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench")
}

/// True under `cargo bench` (which passes `--bench`); false under `cargo test --all-targets`,
/// which runs bench targets without it, and under `cargo bench -- --test`: criterion's rule.
pub fn bench_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test")
}

/// Reads an environment variable as a number, with a default.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().replace('_', "").parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// The machine and the moment.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "date": bson::DateTime::now().try_to_rfc3339_string().unwrap_or_default(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "memory_gib": (mem_kb as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "loadavg_at_start": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

/// Writes one section, merges all sections into `ficus-bench.json` and prints the combined table.
pub fn publish(section: &str, value: Value) {
    let dir = out_dir();
    std::fs::create_dir_all(&dir).expect("creating target/bench");
    let path = dir.join(format!("{section}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).expect("writing a bench section");
    let read = |name: &str| -> Value {
        std::fs::read(dir.join(format!("{name}.json")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    };
    let merged = json!({
        "about": "ficus benchmark figures; see benches/README.md for what each means",
        "pipeline": read("pipeline"),
        "e2e": read("e2e"),
    });
    let out = dir.join("ficus-bench.json");
    std::fs::write(&out, serde_json::to_vec_pretty(&merged).unwrap()).expect("writing ficus-bench.json");
    let table = render(&merged);
    std::fs::write(dir.join("ficus-bench.md"), &table).expect("writing ficus-bench.md");
    println!("\n{table}");
    println!("figures: {}\ntable:   {}", out.display(), dir.join("ficus-bench.md").display());
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// Human formatting: 3 significant digits, thousands as k/M.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let a = x.abs();
    if a >= 1e7 {
        format!("{:.1}M", x / 1e6)
    } else if a >= 1e5 {
        format!("{:.0}k", x / 1e3)
    } else if a >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

/// The combined table (Markdown).
pub fn render(merged: &Value) -> String {
    let mut s = String::new();
    if let Some(e2e) = merged.get("e2e").filter(|v| !v.is_null()) {
        render_e2e(&mut s, e2e);
    }
    if let Some(p) = merged.get("pipeline").filter(|v| !v.is_null()) {
        render_pipeline(&mut s, p);
    }
    if s.is_empty() {
        s.push_str("no figures yet: run `cargo bench`\n");
    }
    s
}

fn machine_line(m: &Value) -> String {
    format!(
        "{} cores ({}), {} GiB, {} build, {}; load average at start {}",
        m["cores"],
        m["cpu"].as_str().unwrap_or("?"),
        m["memory_gib"],
        m["profile"].as_str().unwrap_or("?"),
        m["date"].as_str().unwrap_or("?"),
        m["loadavg_at_start"].as_str().unwrap_or("?"),
    )
}

fn render_pipeline(s: &mut String, p: &Value) {
    let _ = writeln!(s, "## Micro: per stage (criterion, mean per iteration)\n");
    let _ = writeln!(s, "Machine: {}\n", machine_line(&p["machine"]));
    let _ = writeln!(s, "| case | stage | events | bytes | time / iter | per event | events/s | MB/s |");
    let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in p["rows"].as_array().into_iter().flatten() {
        let ns = num(&r["ns_per_iter"]).unwrap_or(f64::NAN);
        let events = num(&r["events"]).unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r["case"].as_str().unwrap_or(""),
            r["stage"].as_str().unwrap_or(""),
            events,
            r["bytes"],
            fmt_ns(ns),
            fmt_ns(ns / events),
            fmt_num(num(&r["events_per_sec"]).unwrap_or(f64::NAN)),
            fmt_num(num(&r["mb_per_sec"]).unwrap_or(f64::NAN)),
        );
    }
    for n in p["notes"].as_array().into_iter().flatten() {
        let _ = writeln!(s, "\n- {}", n.as_str().unwrap_or(""));
    }
    s.push('\n');
}

fn render_e2e(s: &mut String, e: &Value) {
    let _ = writeln!(s, "## End to end (real servers on loopback)\n");
    let _ = writeln!(s, "Machine: {}\n", machine_line(&e["machine"]));
    if let Some(w) = e["workload"].as_object() {
        let parts: Vec<String> = w.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        let _ = writeln!(s, "Workload: {}\n", parts.join(", "));
    }
    let _ = writeln!(s, "| figure | value | ceiling | ratio | goal | |");
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | --- | --- |");
    for f in e["figures"].as_array().into_iter().flatten() {
        let unit = f["unit"].as_str().unwrap_or("");
        let value = num(&f["value"]).map(|v| format!("{} {unit}", fmt_num(v))).unwrap_or_else(|| "-".into());
        let ceiling = num(&f["ceiling"]).map(|v| format!("{} {unit}", fmt_num(v))).unwrap_or_default();
        let ratio = num(&f["ratio"]).map(|r| format!("{r:.2}×")).unwrap_or_default();
        let status = match f["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            f["name"].as_str().unwrap_or(""),
            value,
            ceiling,
            ratio,
            f["goal"].as_str().unwrap_or(""),
            status
        );
    }
    if let Some(cpu) = e["cpu"].as_array().filter(|c| !c.is_empty()) {
        let _ = writeln!(s, "\n### CPU per event (user+system, /proc/<pid>/stat)\n");
        let _ = writeln!(s, "| phase | events | wall s | process | CPU s | µs CPU / event | share of 2 cores |");
        let _ = writeln!(s, "| --- | ---: | ---: | --- | ---: | ---: | ---: |");
        for p in cpu {
            let events = num(&p["events"]).unwrap_or(0.0);
            let wall = num(&p["wall_s"]).unwrap_or(0.0);
            for (proc_, secs) in p["cpu_s"].as_object().into_iter().flatten() {
                let secs = secs.as_f64().unwrap_or(0.0);
                let cores = num(&e["machine"]["cores"]).unwrap_or(1.0);
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} | {} | {:.2} | {:.1} | {:.0}% |",
                    p["phase"].as_str().unwrap_or(""),
                    events,
                    wall,
                    proc_,
                    secs,
                    if events > 0.0 { secs * 1e6 / events } else { f64::NAN },
                    if wall > 0.0 { secs / wall / cores * 100.0 } else { f64::NAN },
                );
            }
        }
    }
    if let Some(v) = e["verdicts"].as_array().filter(|v| !v.is_empty()) {
        let _ = writeln!(s, "\n### Goals\n");
        for line in v {
            let _ = writeln!(s, "- {}", line.as_str().unwrap_or(""));
        }
    }
    for n in e["notes"].as_array().into_iter().flatten() {
        let _ = writeln!(s, "\n- {}", n.as_str().unwrap_or(""));
    }
    s.push('\n');
}
