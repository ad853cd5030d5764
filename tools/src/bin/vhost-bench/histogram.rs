//! A log-linear latency histogram: fixed memory whatever the runtime, within 1/64 (1.6 %)
//! of the true value.

/// Values below this are counted exactly; above, each power of two has this many buckets.
const SUB: u64 = 64;
const SUB_BITS: u32 = SUB.trailing_zeros();

/// Counts of nanosecond values.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            // Enough buckets for every u64.
            counts: vec![0; bucket(u64::MAX) + 1],
            total: 0,
            sum_ns: 0,
        }
    }
}

/// The bucket of `v`.
fn bucket(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let mantissa = (v >> shift) - SUB; // the SUB_BITS bits below the leading one
    (SUB + u64::from(shift) * SUB + mantissa) as usize
}

/// The middle of bucket `b`'s range.
fn value(b: usize) -> f64 {
    let b = b as u64;
    if b < SUB {
        return b as f64;
    }
    let shift = (b - SUB) / SUB;
    let low = (SUB + (b - SUB) % SUB) << shift;
    low as f64 + ((1u64 << shift) as f64 - 1.0) / 2.0
}

impl Histogram {
    /// Counts one value.
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket(ns)] += 1;
        self.total += 1;
        self.sum_ns += u128::from(ns);
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum_ns += other.sum_ns;
    }

    /// The value at quantile `q` (0..=1) in nanoseconds; NaN when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total.max(1));
        let mut seen = 0;
        for (b, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return value(b);
            }
        }
        f64::NAN
    }

    /// The mean in nanoseconds; NaN when empty.
    pub fn mean(&self) -> f64 {
        self.sum_ns as f64 / self.total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..20_000u64).chain([1 << 20, 123_456_789, u64::MAX / 3, u64::MAX]) {
            let b = bucket(v);
            assert!(b >= last, "bucket of {v} goes backwards");
            last = b;
            let mid = value(b);
            assert!(
                (mid - v as f64).abs() <= v as f64 / SUB as f64,
                "{v} lands in a bucket around {mid}"
            );
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let mut other = Histogram::default();
        other.record(10_000_000);
        h.merge(&other);
        let within = |got: f64, want: f64| (got - want).abs() <= want / 64.0;
        assert!(within(h.quantile(0.5), 501_000.0), "{}", h.quantile(0.5));
        assert!(within(h.quantile(0.99), 991_000.0), "{}", h.quantile(0.99));
        assert!(within(h.quantile(1.0), 10_000_000.0));
        assert!((h.mean() - (500_500_000.0 + 10_000_000.0) / 1001.0).abs() < 1e-6);
        assert!(Histogram::default().quantile(0.5).is_nan());
    }
}
