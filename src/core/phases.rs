//! Difficulty-phased training (Phased IFT): a difficulty score per training record, the records
//! split into phases of rising difficulty by quantile, and the random split of the same sizes
//! that serves as the control.
//!
//! Phases are cut within each task, so every phase holds the easiest (then the next, …) share of
//! every task and balanced sampling still sees all tasks in each phase; a global cut would put
//! whole tasks into one phase wherever tasks differ in length.

use std::fmt;
use std::str::FromStr;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// What a record's difficulty is measured by.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Difficulty {
    /// Trained (answer) tokens.
    #[default]
    Length,
    /// A numeric field of the source records.
    Column(String),
    /// The model's mean loss on the record's answer before training.
    Loss,
}

impl Difficulty {
    /// The source field a `column:NAME` difficulty reads.
    pub fn column(&self) -> Option<&str> {
        match self {
            Self::Column(c) => Some(c),
            _ => None,
        }
    }
}

impl fmt::Display for Difficulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length => f.write_str("length"),
            Self::Column(c) => write!(f, "column:{c}"),
            Self::Loss => f.write_str("loss"),
        }
    }
}

impl FromStr for Difficulty {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "length" => Ok(Self::Length),
            "loss" => Ok(Self::Loss),
            other => match other.strip_prefix("column:") {
                Some(c) if !c.trim().is_empty() => Ok(Self::Column(c.trim().to_string())),
                _ => Err(format!(
                    "unknown difficulty '{other}': expected length, loss or column:NAME"
                )),
            },
        }
    }
}

impl TryFrom<String> for Difficulty {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Difficulty> for String {
    fn from(d: Difficulty) -> Self {
        d.to_string()
    }
}

/// What happens to the learning-rate schedule at a phase boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseSchedule {
    /// One schedule over the whole run; weights and optimizer state carry on.
    #[default]
    Continue,
    /// Each phase warms up and decays again; weights and optimizer state carry on.
    Fresh,
}

/// The project's `[training.phases]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhaseSettings {
    /// Phases (1 = one-off training over all records).
    pub count: u32,
    /// What difficulty is measured by.
    pub difficulty: Difficulty,
    /// What the learning rate does at a boundary.
    pub schedule: PhaseSchedule,
    /// The control: phases of the same sizes, records assigned at random.
    pub random: bool,
}

impl Default for PhaseSettings {
    fn default() -> Self {
        Self {
            count: 1,
            difficulty: Difficulty::Length,
            schedule: PhaseSchedule::Continue,
            random: false,
        }
    }
}

impl PhaseSettings {
    /// Whether training is one-off.
    pub fn is_off(&self) -> bool {
        self.count <= 1
    }

    /// How the phases are made, in words.
    pub fn describe(&self) -> String {
        if self.is_off() {
            return "one-off".into();
        }
        format!(
            "{} phases by {}{}{}",
            self.count,
            self.difficulty,
            if self.random {
                ", assigned at random"
            } else {
                ""
            },
            match self.schedule {
                PhaseSchedule::Continue => "",
                PhaseSchedule::Fresh => ", a fresh schedule each",
            }
        )
    }
}

/// The phase (0-based) of each score: the easiest `1/count` share in phase 0 and so on, by
/// quantile of rank (ties kept in record order, so equal scores never straddle more than one
/// cut and the sizes differ by one at most).
pub fn assign_by_quantile(scores: &[f64], count: u32) -> Vec<u32> {
    let n = scores.len();
    let count = count.max(1) as usize;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut out = vec![0u32; n];
    for (rank, &i) in order.iter().enumerate() {
        out[i] = (rank * count / n.max(1)) as u32;
    }
    out
}

/// The control: the same phase sizes, records shuffled among them with `seed`.
pub fn shuffle_assignment(assigned: &[u32], seed: u64) -> Vec<u32> {
    let mut out = assigned.to_vec();
    out.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x7068_6173_6573));
    out
}

/// Between phases, the highest score of the lower phase (`count - 1` values; fewer when a phase
/// is empty).
pub fn cut_points(scores: &[f64], assigned: &[u32], count: u32) -> Vec<f64> {
    (0..count.saturating_sub(1))
        .filter_map(|p| {
            scores
                .iter()
                .zip(assigned)
                .filter(|(_, a)| **a == p)
                .map(|(s, _)| *s)
                .max_by(f64::total_cmp)
        })
        .collect()
}

/// A histogram bar: `[low, high)` (the last one closed) and how many scores fall in it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bin {
    /// Lower edge.
    pub low: f64,
    /// Upper edge.
    pub high: f64,
    /// Scores in it.
    pub count: u64,
}

/// `bins` equal-width bars over the scores' range (one bar when all are equal).
pub fn histogram(scores: &[f64], bins: usize) -> Vec<Bin> {
    let Some(low) = scores.iter().copied().min_by(f64::total_cmp) else {
        return Vec::new();
    };
    let high = scores.iter().copied().max_by(f64::total_cmp).unwrap_or(low);
    if high <= low {
        return vec![Bin {
            low,
            high,
            count: scores.len() as u64,
        }];
    }
    let bins = bins.max(1);
    let width = (high - low) / bins as f64;
    let mut out: Vec<Bin> = (0..bins)
        .map(|i| Bin {
            low: low + width * i as f64,
            high: low + width * (i + 1) as f64,
            count: 0,
        })
        .collect();
    for s in scores {
        let i = (((s - low) / width) as usize).min(bins - 1);
        out[i].count += 1;
    }
    out
}

/// What a run's phases were made of: sent as an event before the first step and drawn as a
/// histogram with the cut points.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DifficultyReport {
    /// How the phases were made ([`PhaseSettings::describe`]).
    pub by: String,
    /// The scores of every training record (all tasks).
    pub histogram: Vec<Bin>,
    /// Each task's cut points between phases.
    pub cuts: Vec<(String, Vec<f64>)>,
    /// Records per phase, all tasks together.
    pub records: Vec<u64>,
    /// Records that had no score (a column missing or not a number) and were scored at their
    /// task's median.
    pub unscored: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_partition_by_score_in_equal_sizes() {
        let scores: Vec<f64> = (0..30).map(|i| f64::from((i * 7) % 30)).collect();
        let a = assign_by_quantile(&scores, 3);
        for p in 0..3 {
            assert_eq!(a.iter().filter(|&&x| x == p).count(), 10);
        }
        // Every score of a phase is at most every score of the next.
        for (i, &pi) in a.iter().enumerate() {
            for (j, &pj) in a.iter().enumerate() {
                if pi < pj {
                    assert!(scores[i] <= scores[j], "{i} {j}");
                }
            }
        }
        let cuts = cut_points(&scores, &a, 3);
        assert_eq!(cuts, vec![9.0, 19.0]);
        // Uneven sizes differ by one at most; ties keep record order.
        let a = assign_by_quantile(&[1.0; 7], 3);
        assert_eq!(a, vec![0, 0, 0, 1, 1, 2, 2]);
        assert!(assign_by_quantile(&[], 3).is_empty());
    }

    #[test]
    fn the_random_control_keeps_the_sizes_and_mixes_the_scores() {
        let scores: Vec<f64> = (0..300).map(f64::from).collect();
        let a = assign_by_quantile(&scores, 3);
        let r = shuffle_assignment(&a, 5);
        for p in 0..3 {
            assert_eq!(
                r.iter().filter(|&&x| x == p).count(),
                a.iter().filter(|&&x| x == p).count()
            );
        }
        let mean = |p: u32| {
            let s: Vec<f64> = (0..300).filter(|&i| r[i] == p).map(|i| scores[i]).collect();
            s.iter().sum::<f64>() / s.len() as f64
        };
        // Each random phase's mean score is near the overall mean (149.5), unlike the sorted
        // phases (49.5, 149.5, 249.5).
        for p in 0..3 {
            assert!((mean(p) - 149.5).abs() < 40.0, "{}", mean(p));
        }
        assert_eq!(r, shuffle_assignment(&a, 5));
    }

    #[test]
    fn difficulty_names_round_trip_and_histograms_count_everything() {
        for s in ["length", "loss", "column:rating"] {
            assert_eq!(s.parse::<Difficulty>().unwrap().to_string(), s);
        }
        assert!("column:".parse::<Difficulty>().is_err());
        assert!(
            "size"
                .parse::<Difficulty>()
                .unwrap_err()
                .contains("column:NAME")
        );
        let h = histogram(&[0.0, 1.0, 2.0, 3.0, 10.0], 5);
        assert_eq!(h.len(), 5);
        assert_eq!(h.iter().map(|b| b.count).sum::<u64>(), 5);
        assert_eq!(h[0].count, 2);
        assert_eq!(h[4].count, 1);
        assert_eq!(histogram(&[2.0, 2.0], 4).len(), 1);
        let toml = toml::to_string(&PhaseSettings {
            count: 3,
            difficulty: Difficulty::Column("level".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(toml.contains("difficulty = \"column:level\""), "{toml}");
        let back: PhaseSettings = toml::from_str(&toml).unwrap();
        assert_eq!(back.difficulty, Difficulty::Column("level".into()));
    }
}
