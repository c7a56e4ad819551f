//! The bench's figures as they go into `target/bench/e2e.json` (rendered by `support`), and the
//! wording of what limited a phase.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::probe::Cpu;

pub fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// Megabytes to the tenth, or null.
pub fn mb(x: Option<f64>) -> Value {
    x.map(|v| json!((v * 10.0).round() / 10.0)).unwrap_or(Value::Null)
}

/// Second by second: which process had a core to itself (≥ 85% of one core) and for how long.
pub fn bound_seconds(timeline: &[Value]) -> String {
    let mut bound: BTreeMap<String, u32> = BTreeMap::new();
    let mut secs = 0;
    for w in timeline.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let dt = b["t"].as_f64().unwrap_or(0.0) - a["t"].as_f64().unwrap_or(0.0);
        if dt <= 0.0 {
            continue;
        }
        secs += 1;
        for (k, v) in b["cpu_s"].as_object().into_iter().flatten() {
            let d = v.as_f64().unwrap_or(0.0) - a["cpu_s"][k].as_f64().unwrap_or(0.0);
            if d / dt >= 0.85 {
                *bound.entry(k.clone()).or_default() += 1;
            }
        }
    }
    if bound.is_empty() {
        return format!("no process had a core to itself in any of {secs} one-second samples");
    }
    let parts: Vec<String> = bound.iter().map(|(k, n)| format!("{k} in {n}")).collect();
    format!("CPU-bound (≥ 85% of a core) seconds out of {secs}: {}", parts.join(", "))
}

/// The limiting process of a phase, by CPU seconds, and whether the machine was saturated.
pub fn limit(cpu: &Cpu, wall: Duration, cores: f64) -> String {
    let mut v: Vec<(&String, &f64)> = cpu.iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1));
    let total: f64 = v.iter().map(|x| *x.1).sum();
    let w = wall.as_secs_f64().max(1e-9);
    let parts: Vec<String> = v.iter().take(4).map(|(k, s)| format!("{k} {:.2} cores", *s / w)).collect();
    let sat = total / w / cores;
    let verdict = match v.first() {
        Some((k, s)) if **s / w >= 0.85 => format!("{k} is CPU-bound (one core is ~{:.0}% busy)", **s / w * 100.0),
        Some((k, _)) if sat >= 0.85 => {
            format!("the machine is saturated ({:.0}% of {cores} cores), {k} uses most", sat * 100.0)
        }
        Some((k, _)) => {
            format!("nothing is CPU-bound ({:.0}% of {cores} cores): latency-bound, {k} uses most", sat * 100.0)
        }
        None => "unknown".into(),
    };
    format!("{verdict} [{}]", parts.join(", "))
}

/// Everything the run reports: figures (`figures` in the JSON), CPU per phase (`cpu`), goal
/// verdicts and notes.
#[derive(Default)]
pub struct Figures {
    pub rows: Vec<Value>,
    pub phases: Vec<Value>,
    pub verdicts: Vec<String>,
    pub notes: Vec<String>,
}

impl Figures {
    /// A figure: its value against its ceiling (`ratio`), and a goal met or not.
    pub fn add(
        &mut self,
        name: &str,
        value: Option<f64>,
        unit: &str,
        ceiling: Option<f64>,
        goal: Option<(&str, bool)>,
        extra: Value,
    ) {
        let ratio = match (value, ceiling) {
            (Some(v), Some(c)) if c > 0.0 => Some((v / c * 1000.0).round() / 1000.0),
            _ => None,
        };
        let mut row = json!({
            "name": name, "value": value.map(|v| (v * 100.0).round() / 100.0), "unit": unit,
            "ceiling": ceiling.map(|v| (v * 100.0).round() / 100.0), "ratio": ratio,
            "goal": goal.map(|g| g.0), "met": goal.map(|g| g.1),
        });
        if let (Value::Object(r), Value::Object(e)) = (&mut row, extra) {
            r.extend(e);
        }
        self.rows.push(row);
    }

    /// A phase's wall time and CPU seconds per process.
    pub fn phase(&mut self, name: &str, events: u64, wall: Duration, cpu: &Cpu, extra: Value) {
        let mut p = json!({ "phase": name, "events": events, "wall_s": (wall.as_secs_f64() * 100.0).round() / 100.0, "cpu_s": cpu });
        if let (Value::Object(r), Value::Object(e)) = (&mut p, extra) {
            r.extend(e);
        }
        self.phases.push(p);
    }

    /// Puts one line per goal (met or missed) before the other verdicts.
    pub fn summarise_goals(&mut self) {
        let mut summary = Vec::new();
        for r in &self.rows {
            if let Some(met) = r["met"].as_bool() {
                summary.push(format!("{}: {}", r["name"].as_str().unwrap_or(""), if met { "met" } else { "MISSED" }));
            }
        }
        self.verdicts.splice(0..0, summary);
    }
}
