//! Task sampling: how many instructions each task contributes to an epoch, and which ones.
//!
//! Every strategy keeps the epoch the size of the natural one (the sum of the tasks' training
//! records) and only changes how it is shared out among tasks.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::core::split::stable_hash;

/// How tasks share an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub enum Strategy {
    /// Each record once: shares follow dataset sizes.
    Natural,
    /// The same number of samples from every task: small tasks cycled, big ones subsampled.
    #[default]
    Balanced,
    /// Shares proportional to size^(1/T): T = 1 is natural, large T approaches balanced.
    Temperature {
        /// The temperature, above zero.
        t: f64,
    },
    /// Shares proportional to each task's weight.
    Weights,
}

impl Strategy {
    /// Every strategy kind, for menus (temperature with its usual T = 2).
    pub const KINDS: [Strategy; 4] = [
        Strategy::Natural,
        Strategy::Balanced,
        Strategy::Temperature { t: 2.0 },
        Strategy::Weights,
    ];

    /// A short name.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Natural => "natural",
            Strategy::Balanced => "balanced",
            Strategy::Temperature { .. } => "temperature",
            Strategy::Weights => "weights",
        }
    }
}

/// One drawn sample: a task and a record index within that task's training records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleRef {
    /// Index of the task.
    pub task: u32,
    /// Index of the record among the task's training records.
    pub record: u32,
}

/// What the sampler needs to know of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSize {
    /// The task's name (seeds its draws, so reordering tasks changes nothing).
    pub name: String,
    /// Number of training records.
    pub records: usize,
    /// Sampling weight (used by [`Strategy::Weights`]).
    pub weight: f64,
}

/// Samples per task in one epoch under `strategy`. The counts add up to the natural epoch size
/// (largest-remainder rounding); a task with no records gets none.
pub fn epoch_counts(tasks: &[TaskSize], strategy: Strategy) -> Vec<usize> {
    let total: usize = tasks.iter().map(|t| t.records).sum();
    let largest = tasks.iter().map(|t| t.records).max().unwrap_or(0).max(1) as f64;
    let shares: Vec<f64> = tasks
        .iter()
        .map(|t| {
            if t.records == 0 {
                return 0.0;
            }
            match strategy {
                Strategy::Natural => t.records as f64,
                Strategy::Balanced => 1.0,
                // Relative to the largest task, in log space, so a small T cannot overflow.
                Strategy::Temperature { t: temp } => {
                    (((t.records as f64).ln() - largest.ln()) / temp.max(1e-6)).exp()
                }
                Strategy::Weights => t.weight.max(0.0),
            }
        })
        .collect();
    let sum: f64 = shares.iter().sum();
    if sum <= 0.0 || total == 0 {
        return vec![0; tasks.len()];
    }
    let exact: Vec<f64> = shares.iter().map(|s| s / sum * total as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut left = total - counts.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..tasks.len()).filter(|&i| shares[i] > 0.0).collect();
    order.sort_by(|&a, &b| {
        let ra = exact[a] - exact[a].floor();
        let rb = exact[b] - exact[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts
}

/// Picks `count` of `n` records: whole shuffled passes while `count ≥ n` (so small tasks are
/// cycled without replacement), then a shuffled partial pass.
fn draw(n: usize, count: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
    let mut out = Vec::with_capacity(count);
    let mut pass: Vec<u32> = (0..n as u32).collect();
    while out.len() < count && n > 0 {
        pass.shuffle(rng);
        let take = (count - out.len()).min(n);
        out.extend_from_slice(&pass[..take]);
    }
    out
}

/// The samples of one epoch, all tasks shuffled together. Same seed and epoch, same list.
pub fn sample_epoch(
    tasks: &[TaskSize],
    strategy: Strategy,
    seed: u64,
    epoch: u32,
) -> Vec<SampleRef> {
    let counts = epoch_counts(tasks, strategy);
    let mut all = Vec::with_capacity(counts.iter().sum());
    for (i, (task, &count)) in tasks.iter().zip(&counts).enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(
            seed ^ stable_hash(task.name.as_bytes()) ^ (u64::from(epoch) << 32),
        );
        all.extend(
            draw(task.records, count, &mut rng)
                .into_iter()
                .map(|record| SampleRef {
                    task: i as u32,
                    record,
                }),
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed.rotate_left(17) ^ u64::from(epoch));
    all.shuffle(&mut rng);
    all
}

/// Per-task numbers of a mixture, before (natural) and after the chosen strategy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MixtureRow {
    /// The task's name.
    pub task: String,
    /// Training records.
    pub records: usize,
    /// Tokens in those records (each once).
    pub tokens: u64,
    /// Samples per epoch with natural sampling.
    pub natural_samples: usize,
    /// Samples per epoch with the chosen strategy.
    pub samples: usize,
    /// Expected tokens per epoch with natural sampling.
    pub natural_tokens: f64,
    /// Expected tokens per epoch with the chosen strategy.
    pub expected_tokens: f64,
    /// Share of samples, natural (0–1).
    pub natural_sample_share: f64,
    /// Share of samples, chosen strategy (0–1).
    pub sample_share: f64,
    /// Share of tokens, natural (0–1).
    pub natural_token_share: f64,
    /// Share of tokens, chosen strategy (0–1).
    pub token_share: f64,
}

/// The mixture view: what each task contributes, in samples and in tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MixturePreview {
    /// The strategy shown.
    pub strategy: Strategy,
    /// Epochs planned.
    pub epochs: u32,
    /// One row per task, in project order.
    pub rows: Vec<MixtureRow>,
}

impl MixturePreview {
    /// Builds the preview from task sizes and each task's token total.
    pub fn build(tasks: &[TaskSize], tokens: &[u64], strategy: Strategy, epochs: u32) -> Self {
        let natural = epoch_counts(tasks, Strategy::Natural);
        let chosen = epoch_counts(tasks, strategy);
        let mean = |i: usize| {
            if tasks[i].records == 0 {
                0.0
            } else {
                tokens.get(i).copied().unwrap_or(0) as f64 / tasks[i].records as f64
            }
        };
        let share = |x: f64, total: f64| if total > 0.0 { x / total } else { 0.0 };
        let nat_tokens: Vec<f64> = (0..tasks.len())
            .map(|i| natural[i] as f64 * mean(i))
            .collect();
        let exp_tokens: Vec<f64> = (0..tasks.len())
            .map(|i| chosen[i] as f64 * mean(i))
            .collect();
        let (ns, cs) = (
            natural.iter().sum::<usize>() as f64,
            chosen.iter().sum::<usize>() as f64,
        );
        let (nt, ct) = (
            nat_tokens.iter().sum::<f64>(),
            exp_tokens.iter().sum::<f64>(),
        );
        let rows = tasks
            .iter()
            .enumerate()
            .map(|(i, t)| MixtureRow {
                task: t.name.clone(),
                records: t.records,
                tokens: tokens.get(i).copied().unwrap_or(0),
                natural_samples: natural[i],
                samples: chosen[i],
                natural_tokens: nat_tokens[i],
                expected_tokens: exp_tokens[i],
                natural_sample_share: share(natural[i] as f64, ns),
                sample_share: share(chosen[i] as f64, cs),
                natural_token_share: share(nat_tokens[i], nt),
                token_share: share(exp_tokens[i], ct),
            })
            .collect();
        Self {
            strategy,
            epochs,
            rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(n: &[usize]) -> Vec<TaskSize> {
        n.iter()
            .enumerate()
            .map(|(i, &records)| TaskSize {
                name: format!("t{i}"),
                records,
                weight: (i + 1) as f64,
            })
            .collect()
    }

    #[test]
    fn counts_per_strategy() {
        let t = sizes(&[100, 164, 400]);
        assert_eq!(epoch_counts(&t, Strategy::Natural), [100, 164, 400]);
        assert_eq!(epoch_counts(&t, Strategy::Balanced), [222, 221, 221]);
        assert_eq!(epoch_counts(&t, Strategy::Weights), [111, 221, 332]);
        let warm = epoch_counts(&t, Strategy::Temperature { t: 2.0 });
        assert_eq!(warm.iter().sum::<usize>(), 664);
        assert!(warm[0] > 100 && warm[2] < 400, "{warm:?}");
        assert_eq!(
            epoch_counts(&t, Strategy::Temperature { t: 1.0 }),
            [100, 164, 400]
        );
        assert_eq!(epoch_counts(&sizes(&[0, 10]), Strategy::Balanced), [0, 10]);
        // A very low temperature gives (almost) everything to the largest task, without overflow.
        let cold = epoch_counts(&sizes(&[2000, 3000]), Strategy::Temperature { t: 0.01 });
        assert_eq!(cold, [0, 5000]);
    }

    #[test]
    fn small_tasks_cycle_without_replacement_and_big_ones_subsample() {
        let t = sizes(&[10, 1000]);
        let epoch = sample_epoch(&t, Strategy::Balanced, 7, 0);
        let small: Vec<u32> = epoch
            .iter()
            .filter(|s| s.task == 0)
            .map(|s| s.record)
            .collect();
        assert_eq!(small.len(), 505);
        // 50 whole passes then 5 distinct: every record 50 or 51 times.
        for r in 0..10 {
            let n = small.iter().filter(|&&x| x == r).count();
            assert!(n == 50 || n == 51, "record {r} drawn {n} times");
        }
        let mut big: Vec<u32> = epoch
            .iter()
            .filter(|s| s.task == 1)
            .map(|s| s.record)
            .collect();
        big.sort_unstable();
        big.dedup();
        assert_eq!(big.len(), 505, "no big-task record is drawn twice");
    }

    #[test]
    fn seeded_reproducible_and_reshuffled_per_epoch() {
        let t = sizes(&[30, 50]);
        let a = sample_epoch(&t, Strategy::Balanced, 1, 0);
        assert_eq!(a, sample_epoch(&t, Strategy::Balanced, 1, 0));
        assert_ne!(a, sample_epoch(&t, Strategy::Balanced, 1, 1));
        assert_ne!(a, sample_epoch(&t, Strategy::Balanced, 2, 0));
        // Tasks are interleaved, not in blocks.
        let switches = a.windows(2).filter(|w| w[0].task != w[1].task).count();
        assert!(switches > 20, "{switches}");
    }

    #[test]
    fn preview_shows_sample_and_token_shares() {
        let t = sizes(&[100, 100]);
        // Task 1 has answers ten times longer: equal samples, unequal tokens.
        let p = MixturePreview::build(&t, &[10_000, 100_000], Strategy::Balanced, 1);
        assert!((p.rows[0].sample_share - 0.5).abs() < 1e-9);
        assert!((p.rows[1].token_share - 100.0 / 110.0).abs() < 1e-9);
        assert_eq!(p.rows[1].expected_tokens, 100_000.0);
    }
}
