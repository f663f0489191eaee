//! Prometheus text exposition, written by hand: both planes export a few counters, gauges and
//! histograms, which do not need a metrics framework.

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A `/metrics` page being written.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

impl Exposition {
    pub fn new() -> Exposition {
        Exposition { out: String::with_capacity(8192) }
    }

    /// Starts a metric family; its samples follow.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) -> &mut Self {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// The samples of one labelled series of a histogram family (see [`Histogram`]).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) -> &mut Self {
        let mut cumulative = 0;
        for (bound, count) in histogram.bounds.iter().zip(&histogram.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = write!(self.out, "{name}_bucket");
            write_labels(&mut self.out, labels, Some(&bound.to_string()));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let count = histogram.count.load(Ordering::Relaxed);
        let _ = write!(self.out, "{name}_bucket");
        write_labels(&mut self.out, labels, Some("+Inf"));
        let _ = writeln!(self.out, " {count}");
        let _ = write!(self.out, "{name}_sum");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = write!(self.out, "{name}_count");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {count}");
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (key, value) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(key);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

/// Upper bounds in seconds for latencies from a millisecond to a minute.
pub const LATENCY_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// A histogram of durations with fixed buckets, updated without locks.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|bound| seconds <= *bound) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(LATENCY_BUCKETS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let histogram = Histogram::new(&[0.01, 0.1]);
        histogram.observe(Duration::from_millis(5));
        histogram.observe(Duration::from_millis(50));
        histogram.observe(Duration::from_secs(1));
        let mut page = Exposition::new();
        page.single("up", "gauge", "Whether it is up.", 1);
        page.family("msgs_total", "counter", "Messages.").sample("msgs_total", &[("instance", "a\"b")], 3);
        page.family("lat_seconds", "histogram", "Latency.").histogram("lat_seconds", &[("channel", "x")], &histogram);
        let text = page.finish();
        assert!(text.contains("# TYPE up gauge\nup 1\n"), "{text}");
        assert!(text.contains("msgs_total{instance=\"a\\\"b\"} 3\n"), "{text}");
        assert!(text.contains("lat_seconds_bucket{channel=\"x\",le=\"0.01\"} 1\n"), "{text}");
        assert!(text.contains("lat_seconds_bucket{channel=\"x\",le=\"0.1\"} 2\n"), "{text}");
        assert!(text.contains("lat_seconds_bucket{channel=\"x\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("lat_seconds_sum{channel=\"x\"} 1.055\n"), "{text}");
        assert!(text.contains("lat_seconds_count{channel=\"x\"} 3\n"), "{text}");
    }
}
