//! Builds a phased run's phases: every training sample scored for difficulty (answer length, a
//! numeric column of the source, or the model's own loss before training), cut into phases by
//! quantile within each task, or shuffled among phases of the same sizes for the control.

use crate::core::dataset::TaskData;
use crate::core::mixing::Prepared;
use crate::core::packing::SampleTokens;
use crate::core::phases::{
    Difficulty, DifficultyReport, PhaseSettings, assign_by_quantile, cut_points, histogram,
    shuffle_assignment,
};
use crate::train::eval::score_samples;
use crate::train::model::Decoder;
use crate::train::trainer::Phases;

/// Each task's samples' difficulty scores, and how many had none (scored at their task's
/// median). `model` and `budget` (tokens per forward pass) serve the loss difficulty.
pub fn difficulty_scores(
    settings: &PhaseSettings,
    prepared: &Prepared,
    data: &[TaskData],
    model: &Decoder,
    budget: usize,
    progress: &mut dyn FnMut(String),
) -> anyhow::Result<(Vec<Vec<f64>>, u64)> {
    let mut unscored = 0u64;
    let mut out = Vec::with_capacity(prepared.tasks.len());
    match &settings.difficulty {
        Difficulty::Length => {
            for t in &prepared.tasks {
                out.push(
                    t.samples
                        .iter()
                        .map(|s| s.labels.iter().filter(|&&l| l >= 0).count() as f64)
                        .collect(),
                );
            }
        }
        Difficulty::Column(name) => {
            let mut any = false;
            for (ti, t) in prepared.tasks.iter().enumerate() {
                let raw: Vec<Option<f64>> = t
                    .record_index
                    .iter()
                    .map(|&i| {
                        data.get(ti)
                            .and_then(|d| d.records.get(i))
                            .and_then(|r| r.score)
                    })
                    .collect();
                let mut known: Vec<f64> = raw.iter().flatten().copied().collect();
                any |= !known.is_empty();
                known.sort_by(f64::total_cmp);
                let median = known.get(known.len() / 2).copied().unwrap_or(0.0);
                unscored += raw.iter().filter(|r| r.is_none()).count() as u64;
                out.push(raw.into_iter().map(|r| r.unwrap_or(median)).collect());
            }
            if !any {
                anyhow::bail!(
                    "no training record has a numeric field '{name}' to score difficulty by; \
                     name a column the source files hold, or use --difficulty length"
                );
            }
        }
        Difficulty::Loss => {
            let total: usize = prepared.tasks.iter().map(|t| t.samples.len()).sum();
            let mut done = 0;
            // Records longer than the model's context are scored on the part it reads (the
            // trainer cuts them too).
            let limit = model.config.max_position_embeddings.max(2);
            for t in &prepared.tasks {
                let fitted: Vec<std::borrow::Cow<SampleTokens>> = t
                    .samples
                    .iter()
                    .map(|s| {
                        if s.input_ids.len() <= limit {
                            std::borrow::Cow::Borrowed(s)
                        } else {
                            std::borrow::Cow::Owned(SampleTokens {
                                input_ids: s.input_ids[..limit].to_vec(),
                                labels: s.labels[..limit].to_vec(),
                                system: s.system.clone(),
                            })
                        }
                    })
                    .collect();
                let samples: Vec<&SampleTokens> = fitted.iter().map(|c| c.as_ref()).collect();
                let scores = score_samples(model, &samples, budget)?;
                done += samples.len();
                progress(format!(
                    "scored {} by the model's loss ({done} of {total} records)",
                    t.name
                ));
                out.push(scores.iter().map(|s| s.mean_loss()).collect());
            }
        }
    }
    Ok((out, unscored))
}

/// Cuts the samples into `settings.count` phases by their scores (within each task), or at
/// random into phases of the same sizes when `settings.random`; with the report to show.
pub fn build_phases(
    settings: &PhaseSettings,
    prepared: &Prepared,
    scores: &[Vec<f64>],
    unscored: u64,
    seed: u64,
) -> (Phases, DifficultyReport) {
    let count = settings.count.max(1);
    let mut assigned = Vec::with_capacity(scores.len());
    let mut cuts = Vec::with_capacity(scores.len());
    for (ti, s) in scores.iter().enumerate() {
        let by_score = assign_by_quantile(s, count);
        cuts.push((
            prepared.tasks[ti].name.clone(),
            cut_points(s, &by_score, count),
        ));
        assigned.push(if settings.random {
            shuffle_assignment(&by_score, seed ^ ti as u64)
        } else {
            by_score
        });
    }
    // Phases no record fell into (tasks smaller than the phase count) are left out.
    let parts: Vec<Prepared> = (0..count)
        .map(|p| prepared.subset(&|t, i| assigned[t][i] == p))
        .filter(|p| p.tasks.iter().any(|t| !t.samples.is_empty()))
        .collect();
    if settings.random {
        // The quantile cuts do not describe a random split.
        cuts.iter_mut().for_each(|(_, c)| c.clear());
    }
    let records = parts
        .iter()
        .map(|p| p.tasks.iter().map(|t| t.samples.len() as u64).sum())
        .collect();
    let all: Vec<f64> = scores.iter().flatten().copied().collect();
    let report = DifficultyReport {
        by: settings.describe(),
        histogram: histogram(&all, 24),
        cuts,
        records,
        unscored,
    };
    (
        Phases {
            parts,
            schedule: settings.schedule,
        },
        report,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::mixing::PreparedTask;
    use crate::core::phases::PhaseSchedule;
    use crate::core::record::Origin;

    fn task(name: &str, answer_lengths: &[usize]) -> PreparedTask {
        let samples: Vec<SampleTokens> = answer_lengths
            .iter()
            .map(|&n| SampleTokens {
                input_ids: vec![1; n + 3],
                labels: (0..n + 3)
                    .map(|j| {
                        if j >= 3 {
                            1
                        } else {
                            crate::core::packing::IGNORE_INDEX
                        }
                    })
                    .collect(),
                system: 0..0,
            })
            .collect();
        let k = samples.len();
        PreparedTask {
            name: name.into(),
            samples,
            origins: (0..k as u64)
                .map(|line| Origin { source: 0, line })
                .collect(),
            record_index: (0..k).collect(),
            failed: Vec::new(),
            weight: 1.0,
            composed: vec![None; k],
        }
    }

    fn prepared() -> Prepared {
        Prepared {
            tasks: vec![
                task("a", &[9, 1, 5, 3, 7, 2, 8, 4, 6]),
                task("b", &[30, 10, 20, 40, 50, 60]),
            ],
            prefix: SampleTokens {
                input_ids: vec![],
                labels: vec![],
                system: 0..0,
            },
        }
    }

    fn lengths(p: &Prepared, t: usize) -> Vec<usize> {
        p.tasks[t]
            .samples
            .iter()
            .map(|s| s.labels.iter().filter(|&&l| l >= 0).count())
            .collect()
    }

    #[test]
    fn phases_partition_every_task_by_its_scores() {
        let prep = prepared();
        let settings = PhaseSettings {
            count: 3,
            ..PhaseSettings::default()
        };
        let scores: Vec<Vec<f64>> = prep
            .tasks
            .iter()
            .map(|t| {
                t.samples
                    .iter()
                    .map(|s| s.labels.iter().filter(|&&l| l >= 0).count() as f64)
                    .collect()
            })
            .collect();
        let (phases, report) = build_phases(&settings, &prep, &scores, 0, 1);
        assert_eq!(phases.parts.len(), 3);
        assert_eq!(phases.schedule, PhaseSchedule::Continue);
        assert_eq!(report.records, vec![5, 5, 5]);
        for t in 0..2 {
            // Every sample in exactly one phase, each phase's answers no longer than the next's.
            let mut all: Vec<usize> = (0..3).flat_map(|p| lengths(&phases.parts[p], t)).collect();
            let mut want = lengths(&prep, t);
            all.sort();
            want.sort();
            assert_eq!(all, want);
            for p in 0..2 {
                let hi = lengths(&phases.parts[p], t).into_iter().max().unwrap();
                let lo = lengths(&phases.parts[p + 1], t).into_iter().min().unwrap();
                assert!(hi <= lo, "task {t} phase {p}: {hi} > {lo}");
            }
        }
        assert_eq!(report.cuts[0], ("a".to_string(), vec![3.0, 6.0]));
        assert_eq!(report.cuts[1], ("b".to_string(), vec![20.0, 40.0]));
        assert_eq!(lengths(&phases.parts[0], 0), vec![1, 3, 2]);
        // Record indices follow the samples into their phase.
        assert_eq!(phases.parts[0].tasks[0].record_index, vec![1, 3, 5]);

        // The control keeps the sizes but not the order.
        let random = PhaseSettings {
            random: true,
            ..settings
        };
        let (control, report) = build_phases(&random, &prep, &scores, 0, 1);
        assert_eq!(report.records, vec![5, 5, 5]);
        let sorted = (0..3).all(|p| {
            (0..2).all(|t| {
                p == 2
                    || lengths(&control.parts[p], t).into_iter().max()
                        <= lengths(&control.parts[p + 1], t).into_iter().min()
            })
        });
        assert!(!sorted, "a shuffled split that happens to be sorted");
    }
}
