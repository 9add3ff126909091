//! Percentiles of latency samples.

/// Samples in milliseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    v: Vec<f64>,
    sorted: bool,
}

impl Samples {
    pub fn with_capacity(n: usize) -> Samples {
        Samples {
            v: Vec::with_capacity(n),
            sorted: true,
        }
    }

    pub fn push(&mut self, ms: f64) {
        self.v.push(ms);
        self.sorted = false;
    }

    pub fn extend(&mut self, other: Samples) {
        self.v.extend(other.v);
        self.sorted = false;
    }

    pub fn len(&self) -> usize {
        self.v.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }

    /// Nearest-rank percentile (`p` in 0..=100); `None` without samples.
    pub fn pct(&mut self, p: f64) -> Option<f64> {
        if self.v.is_empty() {
            return None;
        }
        if !self.sorted {
            self.v.sort_by(f64::total_cmp);
            self.sorted = true;
        }
        let rank = ((p / 100.0) * self.v.len() as f64).ceil() as usize;
        Some(self.v[rank.clamp(1, self.v.len()) - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::Samples;

    #[test]
    fn nearest_rank() {
        let mut s = Samples::default();
        for i in 1..=100 {
            s.push(f64::from(i));
        }
        assert_eq!(s.pct(50.0), Some(50.0));
        assert_eq!(s.pct(99.0), Some(99.0));
        assert_eq!(s.pct(100.0), Some(100.0));
        assert_eq!(Samples::default().pct(50.0), None);
    }
}
