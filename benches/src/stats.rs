//! Latency histograms (microseconds, HdrHistogram, 3 significant digits) that can be merged
//! across worker processes: they travel as hex-encoded V2 serialisations.

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest recorded latency: 10 minutes (longer values are clamped).
const MAX_US: u64 = 600_000_000;

/// A latency histogram in microseconds.
#[derive(Clone, Debug)]
pub struct Lat {
    h: Histogram<u64>,
}

impl Default for Lat {
    fn default() -> Self {
        Self::new()
    }
}

impl Lat {
    /// Empty, 1 µs to 10 min, 3 significant digits.
    pub fn new() -> Self {
        Self {
            h: Histogram::new_with_bounds(1, MAX_US, 3)
                .unwrap_or_else(|_| unreachable!("valid bounds")),
        }
    }

    /// Records a latency given in nanoseconds.
    pub fn record_ns(&mut self, ns: u64) {
        let us = (ns / 1000).clamp(1, MAX_US);
        let _ = self.h.record(us);
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Lat) {
        let _ = self.h.add(&other.h);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// Drops every sample.
    pub fn reset(&mut self) {
        self.h.reset();
    }

    /// Hex of the V2 serialisation.
    pub fn to_hex(&self) -> String {
        let mut buf = Vec::new();
        if V2Serializer::new().serialize(&self.h, &mut buf).is_err() {
            return String::new();
        }
        buf.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`Lat::to_hex`] output; an empty or bad string gives an empty histogram.
    pub fn from_hex(s: &str) -> Lat {
        let bytes: Option<Vec<u8>> = (0..s.len() / 2)
            .map(|i| {
                s.get(2 * i..2 * i + 2)
                    .and_then(|p| u8::from_str_radix(p, 16).ok())
            })
            .collect();
        let Some(bytes) = bytes else {
            return Lat::new();
        };
        if bytes.is_empty() {
            return Lat::new();
        }
        match Deserializer::new().deserialize::<u64, _>(&mut bytes.as_slice()) {
            Ok(h) => {
                let mut l = Lat::new();
                let _ = l.h.add(&h);
                l
            }
            Err(_) => Lat::new(),
        }
    }

    /// Percentiles in microseconds.
    pub fn summary(&self) -> LatSummary {
        let q = |p: f64| {
            if self.h.is_empty() {
                0
            } else {
                self.h.value_at_quantile(p)
            }
        };
        LatSummary {
            count: self.h.len(),
            mean_us: if self.h.is_empty() {
                0.0
            } else {
                self.h.mean()
            },
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: if self.h.is_empty() { 0 } else { self.h.max() },
        }
    }
}

/// What the report shows of a latency histogram.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LatSummary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest sample.
    pub max_us: u64,
}

/// Formats microseconds for the table (µs below 10 ms, ms below 10 s, s above).
pub fn fmt_us(us: u64) -> String {
    if us < 10_000 {
        format!("{us} µs")
    } else if us < 10_000_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_merge() {
        let mut a = Lat::new();
        for i in 1..=1000u64 {
            a.record_ns(i * 1000);
        }
        let b = Lat::from_hex(&a.to_hex());
        assert_eq!(b.count(), 1000);
        let s = b.summary();
        assert!((495..=505).contains(&s.p50_us), "{s:?}");
        let mut c = Lat::new();
        c.merge(&a);
        c.merge(&b);
        assert_eq!(c.count(), 2000);
        assert_eq!(Lat::from_hex("zz").count(), 0);
    }
}
