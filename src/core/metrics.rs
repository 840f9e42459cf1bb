//! A metrics series that stays cheap to keep and to plot however long a run goes: the most recent
//! points at full resolution, older history downsampled by halving (neighbouring points averaged)
//! whenever it fills up.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// One series of (x, y) points, e.g. training loss by step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Older points, each the mean of `stride` original points.
    history: Vec<[f64; 2]>,
    /// How many original points each history point stands for.
    stride: usize,
    /// Original points not yet folded into a history point.
    partial: Vec<[f64; 2]>,
    /// The newest points, untouched.
    recent: VecDeque<[f64; 2]>,
    /// Points kept at full resolution.
    recent_cap: usize,
    /// Most history points before they are halved.
    history_cap: usize,
    /// Points ever pushed.
    total: u64,
}

impl Default for Series {
    fn default() -> Self {
        Self::new(1024, 1024)
    }
}

impl Series {
    /// A series keeping `recent_cap` newest points exactly and at most `history_cap` older ones.
    pub fn new(recent_cap: usize, history_cap: usize) -> Self {
        Self {
            history: Vec::new(),
            stride: 1,
            partial: Vec::new(),
            recent: VecDeque::new(),
            recent_cap: recent_cap.max(1),
            history_cap: history_cap.max(2),
            total: 0,
        }
    }

    /// Adds a point. Non-finite values are kept out of averages (they would poison them) but
    /// still counted.
    pub fn push(&mut self, x: f64, y: f64) {
        self.total += 1;
        if !y.is_finite() {
            return;
        }
        self.recent.push_back([x, y]);
        if self.recent.len() > self.recent_cap
            && let Some(oldest) = self.recent.pop_front()
        {
            self.partial.push(oldest);
            if self.partial.len() == self.stride {
                self.history.push(mean(&self.partial));
                self.partial.clear();
                if self.history.len() >= self.history_cap {
                    self.history = self.history.chunks(2).map(mean).collect();
                    self.stride *= 2;
                }
            }
        }
    }

    /// Points ever pushed.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Points kept (what a plot draws).
    pub fn len(&self) -> usize {
        self.history.len() + usize::from(!self.partial.is_empty()) + self.recent.len()
    }

    /// Whether nothing was kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The points to draw, oldest first.
    pub fn points(&self) -> Vec<[f64; 2]> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.history);
        if !self.partial.is_empty() {
            out.push(mean(&self.partial));
        }
        out.extend(self.recent.iter().copied());
        out
    }

    /// The newest point.
    pub fn last(&self) -> Option<[f64; 2]> {
        self.recent.back().copied()
    }

    /// An exponential moving average of the kept points (bias-corrected like TensorBoard's
    /// smoothing), `weight` in 0–1.
    pub fn smoothed(&self, weight: f64) -> Vec<[f64; 2]> {
        let weight = weight.clamp(0.0, 0.999);
        let mut ema = 0.0;
        let mut correction = 0.0;
        self.points()
            .into_iter()
            .map(|[x, y]| {
                ema = ema * weight + (1.0 - weight) * y;
                correction = correction * weight + (1.0 - weight);
                [x, ema / correction]
            })
            .collect()
    }
}

fn mean(points: &[[f64; 2]]) -> [f64; 2] {
    let n = points.len().max(1) as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), p| (a + p[0], b + p[1]));
    [sx / n, sy / n]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_points_are_exact_and_history_is_halved() {
        let mut s = Series::new(10, 8);
        for i in 0..1000 {
            s.push(i as f64, (i * 2) as f64);
        }
        assert_eq!(s.total(), 1000);
        let pts = s.points();
        // The last ten are untouched.
        assert_eq!(
            &pts[pts.len() - 10..],
            (990..1000)
                .map(|i| [i as f64, (2 * i) as f64])
                .collect::<Vec<_>>()
                .as_slice()
        );
        // Memory stays bounded however long the run.
        assert!(s.len() <= 10 + 8 + 1, "{}", s.len());
        // Averages of a straight line stay on it, and x keeps increasing.
        for p in &pts {
            assert!((p[1] - 2.0 * p[0]).abs() < 1e-9, "{p:?}");
        }
        assert!(pts.windows(2).all(|w| w[0][0] < w[1][0]));
        assert_eq!(pts[0][0], s.points()[0][0]);
    }

    #[test]
    fn smoothing_follows_the_trend_and_skips_nan() {
        let mut s = Series::default();
        for i in 0..100 {
            s.push(i as f64, if i % 2 == 0 { 1.0 } else { 3.0 });
        }
        s.push(100.0, f64::NAN);
        assert_eq!(s.total(), 101);
        assert_eq!(s.len(), 100);
        let sm = s.smoothed(0.9);
        let last = sm.last().unwrap()[1];
        assert!((last - 2.0).abs() < 0.2, "{last}");
        assert_eq!(s.smoothed(0.0), s.points());
    }
}
