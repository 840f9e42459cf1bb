//! Runs an ablation: every run of the plan in turn, on the trainer thread or in a trainer process
//! (as the studio does, so that a run out of memory does not take the window), each in its own folder
//! under `OUT/runs`, skipping the ones already finished and resuming an interrupted one from its
//! checkpoint — so a second invocation with the same folder carries on where the first stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::core::ablation::{AblationPlan, AblationResults, RunKey, RunRecord};
use crate::core::events::{TrainCommand, TrainEvent};
use crate::core::fsutil::write_atomic;
use crate::core::project::Project;
use crate::train::process::{TrainerProcess, spawn_run_process};
use crate::train::trainer::latest_checkpoint;
use crate::train::worker::{ModelChoice, RunSpec, resume_spec, spawn_run};

/// Where an ablation stands, for progress displays.
#[derive(Debug, Clone)]
pub enum AblationProgress {
    /// Run `index` of `total` starts (or resumes).
    RunStarted {
        /// From 0.
        index: usize,
        /// Runs in the plan.
        total: usize,
        /// Which run.
        key: RunKey,
        /// Whether it continues from a checkpoint.
        resumed: bool,
    },
    /// Run `index` had finished before; its results are reused.
    RunSkipped {
        /// From 0.
        index: usize,
        /// Runs in the plan.
        total: usize,
        /// Which run.
        key: RunKey,
    },
    /// An event of the current run.
    Event {
        /// From 0.
        index: usize,
        /// Which run.
        key: RunKey,
        /// The event.
        event: TrainEvent,
    },
}

/// The model an ablation plan names.
pub fn plan_model(plan: &AblationPlan) -> ModelChoice {
    if plan.model == "tiny" {
        ModelChoice::Tiny
    } else {
        ModelChoice::Path(PathBuf::from(&plan.model))
    }
}

/// Writes the plan and the project into `out`, or checks that they match the ones already there
/// (same folder, same plan: resume; another plan: refuse rather than mix results).
pub fn prepare_folder(out: &Path, project: &Project, plan: &AblationPlan) -> anyhow::Result<()> {
    plan.validate().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(out.join("runs"))
        .with_context(|| format!("creating {}", out.display()))?;
    let plan_path = out.join("ablation.json");
    if plan_path.is_file() {
        let saved: AblationPlan = serde_json::from_str(&std::fs::read_to_string(&plan_path)?)
            .with_context(|| format!("reading {}", plan_path.display()))?;
        if saved != *plan {
            anyhow::bail!(
                "{} holds another ablation ({:?} × {:?}, {} tokens, seeds {:?}); choose a new \
                 --out folder, or repeat that plan's options to resume it",
                out.display(),
                saved.variants.iter().map(|v| v.name()).collect::<Vec<_>>(),
                saved
                    .attentions
                    .iter()
                    .map(|a| crate::core::ablation::attention_name(*a))
                    .collect::<Vec<_>>(),
                saved.tokens,
                saved.seeds
            );
        }
    } else {
        write_atomic(&plan_path, serde_json::to_string_pretty(plan)?.as_bytes())?;
    }
    let snapshot = out.join("project.moi.toml");
    if !snapshot.is_file() {
        project
            .clone()
            .save(&snapshot)
            .context("saving the ablation's project")?;
    }
    Ok(())
}

/// Reads back an ablation folder: its plan and every run's results so far.
pub fn load_ablation(out: &Path) -> anyhow::Result<(AblationPlan, AblationResults)> {
    let plan_path = out.join("ablation.json");
    let plan: AblationPlan = serde_json::from_str(
        &std::fs::read_to_string(&plan_path)
            .with_context(|| format!("{} is not an ablation folder", out.display()))?,
    )
    .with_context(|| format!("reading {}", plan_path.display()))?;
    let results = AblationResults::load(out, &plan);
    Ok((plan, results))
}

/// Runs every run of `plan` not yet finished, in order. Returns `true` when all are finished,
/// `false` when `stop` was set (the current run saved a checkpoint and can resume).
pub fn run_ablation(
    project: &Project,
    plan: &AblationPlan,
    out: &Path,
    stop: &Arc<AtomicBool>,
    progress: &mut dyn FnMut(AblationProgress),
) -> anyhow::Result<bool> {
    run_ablation_in(project, plan, out, stop, None, progress)
}

/// [`run_ablation`], each run in a child `trainer` process when one is given (the studio's
/// way: a run killed for memory fails the ablation with a message, the window stays), on a
/// thread of this process otherwise.
pub fn run_ablation_in(
    project: &Project,
    plan: &AblationPlan,
    out: &Path,
    stop: &Arc<AtomicBool>,
    trainer: Option<&TrainerProcess>,
    progress: &mut dyn FnMut(AblationProgress),
) -> anyhow::Result<bool> {
    prepare_folder(out, project, plan)?;
    // Every run trains the project as it was when the ablation started, even when resumed
    // after the project was edited.
    let snapshot = Project::load(&out.join("project.moi.toml"))?;
    let project = &snapshot;
    let runs = plan.runs();
    let total = runs.len();
    let runs_dir = out.join("runs");
    for (index, key) in runs.into_iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let dir = runs_dir.join(key.dir_name());
        if RunRecord::load(&dir).is_ok_and(|r| r.finished) {
            progress(AblationProgress::RunSkipped { index, total, key });
            continue;
        }
        let resumable = dir.join("run.json").is_file() && latest_checkpoint(&dir).is_some();
        let spec = if resumable {
            resume_spec(&dir)?
        } else {
            if dir.exists() {
                // Started but killed before its first checkpoint: start it again.
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("clearing {}", dir.display()))?;
            }
            let mut spec = RunSpec::new(plan.project_for(project, &key), plan_model(plan));
            spec.runs_dir = runs_dir.clone();
            spec.name = Some(key.dir_name());
            spec
        };
        progress(AblationProgress::RunStarted {
            index,
            total,
            key,
            resumed: resumable,
        });
        let handle = match trainer {
            Some(process) => spawn_run_process(spec, Arc::new(|| {}), process)?,
            None => spawn_run(spec, Arc::new(|| {}))?,
        };
        let mut stop_sent = false;
        let ending = loop {
            if !stop_sent && stop.load(Ordering::SeqCst) {
                // The flag stops a thread's run; a trainer process hears the command.
                handle.stop.store(true, Ordering::SeqCst);
                let _ = handle.commands.try_send(TrainCommand::Stop);
                stop_sent = true;
            }
            match handle.events.recv_timeout(Duration::from_millis(200)) {
                Ok(event) => {
                    let end = event.is_terminal();
                    progress(AblationProgress::Event {
                        index,
                        key,
                        event: event.clone(),
                    });
                    if end {
                        break event;
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    break TrainEvent::Failed {
                        error: "the trainer ended without a word".into(),
                    };
                }
            }
        };
        handle.join();
        match ending {
            TrainEvent::Finished { .. } => {}
            TrainEvent::Stopped { .. } => return Ok(false),
            TrainEvent::Failed { error } => {
                anyhow::bail!("run {} failed: {error}", key.dir_name())
            }
            _ => {}
        }
    }
    Ok(true)
}
