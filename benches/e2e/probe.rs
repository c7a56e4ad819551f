//! What the bench reads while ficus works: CPU time and memory of processes (`/proc`), ficus's
//! own metrics (`/metrics`, Prometheus text), and how far a topic has got (high watermarks).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};

use ficus::bus::{ClientRole, Reader, client_config};
use ficus::config::KafkaConfig;

use crate::SERVICE;
use crate::common;

// ---------------------------------------------------------------------------------------------
// Processes: CPU seconds and memory from /proc.

fn clk_tck() -> f64 {
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_secs(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clk_tck())
}

fn status_kb(pid: i32, field: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds of every waited-for child (rusage), for ficus commands that exit.
pub fn children_cpu() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe {
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds per process.
pub type Cpu = BTreeMap<String, f64>;

/// The long-lived processes whose CPU is accounted per phase: the servers and the bench itself.
pub struct Procs {
    pub named: Vec<(&'static str, i32)>,
}

impl Procs {
    /// Each process's CPU seconds so far, and a ficus process's as `ficus`.
    pub fn snapshot(&self, ficus: Option<i32>) -> Cpu {
        let mut m = BTreeMap::new();
        for (name, pid) in &self.named {
            m.insert(name.to_string(), cpu_secs(*pid).unwrap_or(0.0));
        }
        if let Some(pid) = ficus {
            m.insert("ficus".into(), cpu_secs(pid).unwrap_or(0.0));
        }
        m
    }
}

/// CPU seconds per process between two snapshots, to the hundredth.
pub fn cpu_delta(before: &Cpu, after: &Cpu) -> Cpu {
    after
        .iter()
        .map(|(k, v)| (k.clone(), ((v - before.get(k).copied().unwrap_or(0.0)) * 100.0).round() / 100.0))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A ficus child process (`tests/common`'s), with its metrics port.

pub struct Ficus {
    pub proc: common::Ficus,
    /// `--metrics-addr` of a `ficus run`.
    pub metrics: Option<u16>,
}

impl Ficus {
    /// The process id, or -1 once it has exited.
    pub fn pid(&self) -> i32 {
        self.proc.pid().map(|p| p as i32).unwrap_or(-1)
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// Panics with the log if the process has exited.
    pub fn check_alive(&mut self) {
        if self.proc.pid().is_some()
            && let Some(st) = self.proc.wait(Duration::ZERO)
        {
            let log = self.logs();
            let tail: String =
                log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            panic!("ficus exited early ({st}); last log lines:\n{tail}");
        }
    }

    pub fn peak_rss_mb(&self) -> Option<f64> {
        status_kb(self.pid(), "VmHWM:").map(|kb| kb / 1024.0)
    }

    pub fn rss_mb(&self) -> Option<f64> {
        status_kb(self.pid(), "VmRSS:").map(|kb| kb / 1024.0)
    }

    /// SIGTERM and wait (ficus drains, checkpoints and exits 0); SIGKILL after a minute.
    pub fn stop(&mut self) {
        if let Some(pid) = self.proc.pid() {
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
            if self.proc.wait(Duration::from_secs(60)).is_none() {
                self.proc.sigkill();
            }
        }
    }

    /// Waits for a line of the log (panics if ficus exits first).
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logs().contains(needle) {
                return true;
            }
            self.check_alive();
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn scrape(&self) -> Metrics {
        self.metrics.map(scrape).unwrap_or_default()
    }

    /// `ficus_events_applied_total` of the bench's service.
    pub fn applied(&self) -> u64 {
        self.scrape().sum("ficus_events_applied_total", SERVICE) as u64
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus text from ficus's /metrics.

#[derive(Default, Debug, Clone)]
pub struct Metrics {
    /// (name, labels, value)
    samples: Vec<(String, String, f64)>,
}

fn scrape(port: u16) -> Metrics {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return Metrics::default() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    let mut m = Metrics::default();
    for line in body.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((lhs, value)) = line.rsplit_once(' ') else { continue };
        let Ok(v) = value.parse::<f64>() else { continue };
        let (name, labels) = match lhs.split_once('{') {
            Some((n, l)) => (n.to_string(), l.trim_end_matches('}').to_string()),
            None => (lhs.to_string(), String::new()),
        };
        m.samples.push((name, labels, v));
    }
    m
}

impl Metrics {
    /// The sum of `name` over the series whose labels contain `label`.
    pub fn sum(&self, name: &str, label: &str) -> f64 {
        self.samples.iter().filter(|(n, l, _)| n == name && l.contains(label)).map(|s| s.2).sum()
    }

    /// Cumulative histogram buckets (le → count) of `name` with `label`.
    pub fn buckets(&self, name: &str, label: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut out: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|(n, l, _)| *n == bucket && l.contains(label))
            .filter_map(|(_, l, v)| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((le, *v))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// What ficus's consume histograms say between two scrapes: batches, mean batch size, time in
/// the sink (`ficus_consume_apply_seconds`, the write of a whole batch) against the wall time.
pub fn consume_stats(before: &Metrics, after: &Metrics, wall: Duration) -> Value {
    let d = |name: &str| after.sum(name, SERVICE) - before.sum(name, SERVICE);
    let batches = d("ficus_consume_batch_size_count");
    let messages = d("ficus_consume_batch_size_sum");
    let apply = d("ficus_consume_apply_seconds_sum");
    json!({
        "batches": batches,
        "mean_batch": if batches > 0.0 { (messages / batches * 10.0).round() / 10.0 } else { 0.0 },
        "sink_s": (apply * 100.0).round() / 100.0,
        "mean_sink_ms_per_batch": if batches > 0.0 { (apply / batches * 1e4).round() / 10.0 } else { 0.0 },
        "sink_share_of_wall": (apply / wall.as_secs_f64().max(1e-9) * 100.0).round() / 100.0,
    })
}

/// Quantile from cumulative buckets (linear within a bucket, as Prometheus' histogram_quantile).
pub fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in buckets {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let inbucket = c - prev.1;
            let frac = if inbucket > 0.0 { (rank - prev.1) / inbucket } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, c);
    }
    None
}

pub fn exact_quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

// ---------------------------------------------------------------------------------------------
// Kafka: how many records a topic holds, and a consumer group moved to the end.

/// A topic's high watermarks, read through ficus's own [`Reader`].
pub struct Watermarks {
    reader: Reader,
    partitions: Vec<i32>,
    topic: String,
}

impl Watermarks {
    pub fn new(kafka: &KafkaConfig, topic: &str) -> Watermarks {
        let reader = Reader::new(kafka, "ficus-bench-watermarks", None).expect("watermark client");
        let partitions = reader.partitions(topic).expect("metadata");
        assert!(!partitions.is_empty(), "topic {topic} has no partitions");
        Watermarks { reader, partitions, topic: topic.into() }
    }

    fn highs(&self) -> Vec<(i32, i64)> {
        self.partitions.iter().map(|&p| (p, self.reader.watermarks(&self.topic, p).expect("watermarks").1)).collect()
    }

    /// Records in the topic: the sum of its partitions' high watermarks.
    pub fn total(&self) -> u64 {
        self.highs().iter().map(|(_, h)| *h as u64).sum()
    }
}

/// Moves a consumer group's committed offsets to the end of `topic` (nothing left to consume).
pub fn skip_to_end(kafka: &KafkaConfig, group: &str, topic: &str) {
    let w = Watermarks::new(kafka, topic);
    let consumer: BaseConsumer =
        client_config(kafka, ClientRole::Reader { group: Some(group) }, "ficus-bench").create().expect("group client");
    let mut tpl = TopicPartitionList::new();
    for (p, high) in w.highs() {
        tpl.add_partition_offset(topic, p, Offset::Offset(high)).unwrap();
    }
    consumer.commit(&tpl, CommitMode::Sync).expect("committing the group's offsets");
}
