//! What the daemon counts: the counters behind `GET /_/metrics`, and the
//! gauges read at scrape time from where they live (the admission lanes).

use std::sync::atomic::Ordering;

/// Upper bounds (seconds) of the invocation-duration histogram buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Where an install came from, for `edgefaas_installs_total`.
#[derive(Clone, Copy)]
pub enum Origin {
    Url,
    Upload,
    SourceDir,
}

/// Counters since start-up, rendered in the Prometheus text format.
pub struct Metrics {
    started: std::time::SystemTime,
    clock: std::time::Instant,
    functions: std::sync::Mutex<std::collections::BTreeMap<String, FunctionStats>>,
    installs: [std::sync::atomic::AtomicU64; 3],
    /// Invocations refused by admission: queue full, wait ran out.
    refused: [std::sync::atomic::AtomicU64; 2],
    deletes: std::sync::atomic::AtomicU64,
    download_bytes: std::sync::atomic::AtomicU64,
    /// Event counters: (metric, function) -> count; function "" for node-wide ones.
    events: std::sync::Mutex<std::collections::BTreeMap<(&'static str, String), u64>>,
}

/// The event counters and their help, in the order they are rendered.
const EVENT_COUNTERS: &[(&str, &str)] = &[
    (
        "edgefaas_mqtt_messages_received_total",
        "MQTT messages that invoked a function.",
    ),
    (
        "edgefaas_mqtt_messages_acked_total",
        "MQTT messages acknowledged after the function succeeded (or was dead-lettered).",
    ),
    (
        "edgefaas_mqtt_messages_retried_total",
        "MQTT messages run again after a failure.",
    ),
    (
        "edgefaas_mqtt_messages_dead_lettered_total",
        "MQTT messages published to the dead-letter topic after their retries.",
    ),
    (
        "edgefaas_mqtt_publishes_total",
        "Replies and dead letters published to the broker.",
    ),
    (
        "edgefaas_mqtt_spool_dropped_total",
        "Spooled publishes dropped (the oldest) past the spool's bound.",
    ),
    (
        "edgefaas_mqtt_connects_total",
        "Sessions opened with the broker.",
    ),
    (
        "edgefaas_mqtt_messages_dropped_total",
        "QoS 0 messages dropped: the node was busy, or too many messages were in progress.",
    ),
    (
        "edgefaas_mqtt_publishes_refused_total",
        "Replies not published: not a valid topic, or over the broker's maximum packet size.",
    ),
    (
        "edgefaas_mqtt_subscriptions_refused_total",
        "Subscriptions the broker refused (tried again at the next install or connection).",
    ),
    ("edgefaas_schedule_runs_total", "Scheduled runs started."),
    (
        "edgefaas_schedule_skips_total",
        "Scheduled runs skipped because the previous one was still going.",
    ),
    (
        "edgefaas_async_calls_total",
        "Async calls run to an answer.",
    ),
    (
        "edgefaas_async_callback_failures_total",
        "Async callbacks given up after their retries.",
    ),
];

#[derive(Default)]
struct FunctionStats {
    /// Answers by status class: 1xx .. 5xx.
    classes: [u64; 5],
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// What the renderer reads from elsewhere in the daemon at scrape time.
pub struct Gauges {
    pub inflight: usize,
    pub queued: usize,
    pub max_inflight: usize,
    pub max_queue: usize,
    pub zygotes: usize,
    /// Sandbox features on (1) or off (0), and the Landlock ABI in use.
    pub sandbox: Vec<(&'static str, bool)>,
    pub landlock_abi: i32,
    /// Async calls queued or running.
    pub async_depth: usize,
    /// MQTT: configured, connected, spooled publishes waiting.
    pub mqtt: Option<(bool, usize)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: std::time::SystemTime::now(),
            clock: std::time::Instant::now(),
            functions: Default::default(),
            installs: Default::default(),
            refused: Default::default(),
            deletes: Default::default(),
            download_bytes: Default::default(),
            events: Default::default(),
        }
    }
}

impl Metrics {
    /// Counts one invocation of `function` that answered `status` after `secs`.
    pub fn invoked(&self, function: &str, status: u16, secs: f64) {
        let mut map = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        let stats = map.entry(function.to_string()).or_default();
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        stats.classes[class] += 1;
        for (bucket, bound) in stats.buckets.iter_mut().zip(BUCKETS) {
            if secs <= bound {
                *bucket += 1;
            }
        }
        stats.sum += secs;
        stats.count += 1;
    }

    /// Counts an invocation admission refused (answered with `status` after `secs`).
    pub fn refused(&self, function: &str, why: crate::admission::Refused, status: u16, secs: f64) {
        use crate::admission::Refused;
        match why {
            Refused::Full => self.refused[0].fetch_add(1, Ordering::Relaxed),
            Refused::TimedOut => self.refused[1].fetch_add(1, Ordering::Relaxed),
            Refused::ShuttingDown => 0,
        };
        self.invoked(function, status, secs);
    }

    /// Counts an install.
    pub fn installed(&self, origin: Origin) {
        self.installs[origin as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a delete.
    pub fn deleted(&self) {
        self.deletes.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one event of `metric` (one of EVENT_COUNTERS) for `function` ("" for the node).
    pub fn count(&self, metric: &'static str, function: &str) {
        debug_assert!(EVENT_COUNTERS.iter().any(|(m, _)| *m == metric), "{metric}");
        *self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((metric, function.to_string()))
            .or_insert(0) += 1;
    }

    /// Counts an async call's answer.
    pub fn async_done(&self, function: &str, _status: u16) {
        self.count("edgefaas_async_calls_total", function);
    }

    /// Counts an async callback given up.
    pub fn callback_failed(&self) {
        self.count("edgefaas_async_callback_failures_total", "");
    }

    /// Counts downloaded function bytes.
    pub fn downloaded(&self, bytes: usize) {
        self.download_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let map = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        head(
            &mut o,
            "edgefaas_invocations_total",
            "counter",
            "Invocations answered, by function and status class.",
        );
        for (f, s) in map.iter() {
            for (i, n) in s.classes.iter().enumerate().filter(|(_, n)| **n > 0) {
                let _ = writeln!(
                    o,
                    "edgefaas_invocations_total{{function=\"{f}\",status=\"{}xx\"}} {n}",
                    i + 1
                );
            }
        }
        head(
            &mut o,
            "edgefaas_invocation_errors_total",
            "counter",
            "Invocations that answered 5xx (failed, timed out, killed).",
        );
        for (f, s) in map.iter() {
            let _ = writeln!(
                o,
                "edgefaas_invocation_errors_total{{function=\"{f}\"}} {}",
                s.classes[4]
            );
        }
        head(
            &mut o,
            "edgefaas_invocation_duration_seconds",
            "histogram",
            "Time from request to answer, by function.",
        );
        for (f, s) in map.iter() {
            for (n, bound) in s.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    o,
                    "edgefaas_invocation_duration_seconds_bucket{{function=\"{f}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                o,
                "edgefaas_invocation_duration_seconds_bucket{{function=\"{f}\",le=\"+Inf\"}} {}",
                s.count
            );
            let _ = writeln!(
                o,
                "edgefaas_invocation_duration_seconds_sum{{function=\"{f}\"}} {}",
                s.sum
            );
            let _ = writeln!(
                o,
                "edgefaas_invocation_duration_seconds_count{{function=\"{f}\"}} {}",
                s.count
            );
        }
        drop(map);
        head(
            &mut o,
            "edgefaas_inflight_invocations",
            "gauge",
            "Invocations running now.",
        );
        let _ = writeln!(o, "edgefaas_inflight_invocations {}", g.inflight);
        head(
            &mut o,
            "edgefaas_max_inflight_invocations",
            "gauge",
            "EDGEFAAS_MAX_INFLIGHT.",
        );
        let _ = writeln!(o, "edgefaas_max_inflight_invocations {}", g.max_inflight);
        head(
            &mut o,
            "edgefaas_queued_invocations",
            "gauge",
            "Invocations waiting for a slot.",
        );
        let _ = writeln!(o, "edgefaas_queued_invocations {}", g.queued);
        head(
            &mut o,
            "edgefaas_max_queued_invocations",
            "gauge",
            "EDGEFAAS_MAX_QUEUE.",
        );
        let _ = writeln!(o, "edgefaas_max_queued_invocations {}", g.max_queue);
        head(
            &mut o,
            "edgefaas_refused_invocations_total",
            "counter",
            "Invocations answered 429: the queue was full, or the wait ran out.",
        );
        for (i, reason) in ["queue_full", "queue_timeout"].iter().enumerate() {
            let _ = writeln!(
                o,
                "edgefaas_refused_invocations_total{{reason=\"{reason}\"}} {}",
                self.refused[i].load(Ordering::Relaxed)
            );
        }
        head(
            &mut o,
            "edgefaas_warm_zygotes",
            "gauge",
            "Functions with a warm zygote (fork mode).",
        );
        let _ = writeln!(o, "edgefaas_warm_zygotes {}", g.zygotes);
        head(
            &mut o,
            "edgefaas_sandbox",
            "gauge",
            "Protections applied to every function process (1) or missing (0).",
        );
        for (feature, on) in &g.sandbox {
            let _ = writeln!(
                o,
                "edgefaas_sandbox{{feature=\"{feature}\"}} {}",
                u8::from(*on)
            );
        }
        head(
            &mut o,
            "edgefaas_landlock_abi",
            "gauge",
            "The Landlock ABI functions are confined with (0: none).",
        );
        let _ = writeln!(o, "edgefaas_landlock_abi {}", g.landlock_abi);
        head(
            &mut o,
            "edgefaas_async_queue_depth",
            "gauge",
            "Async calls queued or running.",
        );
        let _ = writeln!(o, "edgefaas_async_queue_depth {}", g.async_depth);
        if let Some((connected, spooled)) = g.mqtt {
            head(
                &mut o,
                "edgefaas_mqtt_connected",
                "gauge",
                "1 while the session with the broker is up.",
            );
            let _ = writeln!(o, "edgefaas_mqtt_connected {}", u8::from(connected));
            head(
                &mut o,
                "edgefaas_mqtt_spool_depth",
                "gauge",
                "Publishes spooled on disk, waiting for the broker.",
            );
            let _ = writeln!(o, "edgefaas_mqtt_spool_depth {spooled}");
        }
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        for (metric, help) in EVENT_COUNTERS {
            head(&mut o, metric, "counter", help);
            for ((m, function), n) in events.iter().filter(|((m, _), _)| m == metric) {
                if function.is_empty() {
                    let _ = writeln!(o, "{m} {n}");
                } else {
                    let _ = writeln!(o, "{m}{{function=\"{function}\"}} {n}");
                }
            }
        }
        head(
            &mut o,
            "edgefaas_installs_total",
            "counter",
            "Functions installed or updated, by source.",
        );
        for (i, source) in ["url", "upload", "source_dir"].iter().enumerate() {
            let _ = writeln!(
                o,
                "edgefaas_installs_total{{source=\"{source}\"}} {}",
                self.installs[i].load(Ordering::Relaxed)
            );
        }
        head(
            &mut o,
            "edgefaas_deletes_total",
            "counter",
            "Functions deleted.",
        );
        let _ = writeln!(
            o,
            "edgefaas_deletes_total {}",
            self.deletes.load(Ordering::Relaxed)
        );
        head(
            &mut o,
            "edgefaas_download_bytes_total",
            "counter",
            "Bytes of function files downloaded.",
        );
        let _ = writeln!(
            o,
            "edgefaas_download_bytes_total {}",
            self.download_bytes.load(Ordering::Relaxed)
        );
        head(
            &mut o,
            "edgefaas_uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
        );
        let _ = writeln!(
            o,
            "edgefaas_uptime_seconds {:.3}",
            self.clock.elapsed().as_secs_f64()
        );
        head(
            &mut o,
            "process_start_time_seconds",
            "gauge",
            "Start time of the daemon since the Unix epoch.",
        );
        let start = self
            .started
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let _ = writeln!(o, "process_start_time_seconds {start:.3}");
        head(
            &mut o,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the daemon process (not its functions).",
        );
        let _ = writeln!(o, "process_resident_memory_bytes {}", rss_bytes());
        head(
            &mut o,
            "edgefaas_build_info",
            "gauge",
            "Always 1; the version is a label.",
        );
        let _ = writeln!(
            o,
            "edgefaas_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        o
    }
}

/// VmRSS of this process, from /proc/self/status (kB there; page-size independent).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn histogram_buckets_are_cumulative_and_classes_split() {
        let m = Metrics::default();
        m.invoked("f", 200, 0.003);
        m.invoked("f", 504, 2.0);
        let text = m.render(&Gauges {
            inflight: 1,
            queued: 0,
            max_inflight: 3,
            max_queue: 8,
            zygotes: 0,
            sandbox: vec![("seccomp", true)],
            landlock_abi: 6,
            async_depth: 0,
            mqtt: None,
        });
        assert!(text.contains("edgefaas_invocations_total{function=\"f\",status=\"2xx\"} 1\n"));
        assert!(text.contains("edgefaas_invocations_total{function=\"f\",status=\"5xx\"} 1\n"));
        assert!(text.contains("edgefaas_invocation_errors_total{function=\"f\"} 1\n"));
        assert!(text.contains("le=\"0.0025\"} 0\n"));
        assert!(text.contains("le=\"0.005\"} 1\n"));
        assert!(text.contains("le=\"2.5\"} 2\n"));
        assert!(text.contains("le=\"+Inf\"} 2\n"));
        assert!(text.contains("edgefaas_inflight_invocations 1\n"));
    }

    use super::*;
}
