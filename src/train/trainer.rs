//! The training loop: packed MoI rows in, AdamW steps out, lifecycle events to whoever listens,
//! checkpoints that resume exactly (weights, optimizer moments, step and data position).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor, Var};
use crossbeam_channel::Receiver;
use serde::{Deserialize, Serialize};

use crate::core::events::{EventSender, StepMetrics, TrainCommand, TrainEvent};
use crate::core::mixing::Prepared;
use crate::core::packing::{PackPlan, PackSettings};
use crate::core::phases::PhaseSchedule;
use crate::core::settings::MixSettings;
pub use crate::core::train_settings::TrainSettings;
use crate::train::batch::{StepNorm, TaskLossSums, batch_backward, make_step_batch};
use crate::train::chat::Chat;
use crate::train::eval::{EvalSet, evaluate, watched_loss};
use crate::train::model::Decoder;
use crate::train::optim::{AdamW, accumulate_grads, clip_grad_norm, lr_at};

/// Where the run is: what resuming needs besides weights and moments.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch the next batch comes from.
    pub epoch: u32,
    /// Index of the next row in that epoch's plan.
    pub row: usize,
    /// Steps the whole run plans.
    pub total_steps: u64,
    /// Best watched eval loss so far (early stopping).
    #[serde(default)]
    pub best_eval: Option<f64>,
    /// Evaluations since the best one.
    #[serde(default)]
    pub evals_since_best: u32,
    /// Non-padding tokens trained on so far.
    #[serde(default)]
    pub tokens: u64,
    /// The phase the run is in (phased training; 0 otherwise).
    #[serde(default)]
    pub phase: u32,
    /// Steps done when that phase began.
    #[serde(default)]
    pub phase_step0: u64,
}

/// A phased run's data: the training samples of each phase, easiest first.
#[derive(Debug, Clone)]
pub struct Phases {
    /// Each phase's samples.
    pub parts: Vec<Prepared>,
    /// What the learning rate does at a boundary.
    pub schedule: PhaseSchedule,
}

/// Where a phase ends, counted from the run's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseSpan {
    /// Steps the phase plans.
    pub steps: u64,
    /// Steps done by its end.
    pub end_step: u64,
    /// Tokens trained on by its end, for a token budget.
    pub end_tokens: Option<u64>,
}

/// Everything a run needs.
pub struct TrainJob<'a> {
    /// The model to train.
    pub model: &'a Decoder,
    /// Its weights by name (all trained).
    pub weights: &'a [(String, Var)],
    /// Tokenized tasks.
    pub prepared: &'a Prepared,
    /// Sampling settings.
    pub mix: &'a MixSettings,
    /// Packing settings.
    pub pack: &'a PackSettings,
    /// Training settings.
    pub train: &'a TrainSettings,
    /// Seed of sampling and packing.
    pub seed: u64,
    /// Where checkpoints go.
    pub out_dir: &'a Path,
    /// Held-out items to evaluate, if any.
    pub eval: Option<&'a EvalSet>,
    /// Tokenizer and template for answering prompts mid-run, if wanted.
    pub chat: Option<&'a Chat<'a>>,
    /// Phases to train one after the other, if the run is phased.
    pub phases: Option<&'a Phases>,
}

impl TrainJob<'_> {
    /// The samples phase `phase` trains on (all of them when the run is not phased).
    fn part(&self, phase: u32) -> &Prepared {
        match self.phases {
            Some(p) => &p.parts[(phase as usize).min(p.parts.len().saturating_sub(1))],
            None => self.prepared,
        }
    }

    /// Samples and packs one epoch of one phase.
    fn pack_epoch(&self, phase: u32, epoch: u32) -> PackPlan {
        let seed = self.seed ^ (u64::from(phase) << 40);
        self.part(phase)
            .pack_epoch(self.mix, self.pack, seed, epoch)
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// All planned steps done.
    Finished,
    /// Stopped on request.
    Stopped,
    /// Stopped because the eval loss stopped improving.
    EarlyStopped,
}

/// Steps one phase (or the whole run) plans: for a token budget, the steps that hold it at the
/// first epoch's tokens per step; else `max_steps`, or every epoch's rows.
fn steps_for(job: &TrainJob, phase: u32, budget: Option<u64>, max_steps: Option<u64>) -> u64 {
    let per_step = (job.train.batch_rows * job.train.grad_accum).max(1);
    let part = job.part(phase);
    if let Some(budget) = budget {
        let plan = job.pack_epoch(phase, 0);
        let tokens: u64 = (0..plan.rows.len())
            .map(|i| part.row(&plan, i, job.pack).input_ids.len() as u64)
            .sum();
        let steps = plan.rows.len().div_ceil(per_step).max(1) as u64;
        let per = (tokens / steps).max(1);
        return budget.div_ceil(per).max(1);
    }
    if let Some(s) = max_steps {
        return s;
    }
    (0..job.mix.epochs.max(1))
        .map(|e| job.pack_epoch(phase, e).rows.len().div_ceil(per_step) as u64)
        .sum::<u64>()
        .max(1)
}

/// Where each phase ends. A token budget or a step limit is shared out in proportion to the
/// phases' tokens (the last phase takes what rounding leaves); otherwise each phase trains the
/// mixing epochs over its own records.
pub fn phase_spans(job: &TrainJob) -> Vec<PhaseSpan> {
    let Some(phases) = job.phases else {
        let steps = steps_for(job, 0, job.train.max_tokens, job.train.max_steps);
        return vec![PhaseSpan {
            steps,
            end_step: steps,
            end_tokens: job.train.max_tokens,
        }];
    };
    let n = phases.parts.len() as u32;
    let tokens: Vec<u64> = phases
        .parts
        .iter()
        .map(|p| p.tasks.iter().map(|t| t.tokens()).sum())
        .collect();
    // The part of `total` phase `p` takes: the rounding of the cumulative shares, so the
    // parts add up to `total` (u128: a budget times a corpus's tokens overflows u64).
    let cumulative = |total: u64, weights: &[u64], upto: usize| -> u64 {
        let all = weights.iter().sum::<u64>().max(1) as u128;
        let before: u128 = weights[..upto].iter().map(|&w| w as u128).sum();
        (total as u128 * before / all) as u64
    };
    let share = |total: u64, weights: &[u64], p: usize| -> u64 {
        if p + 1 == weights.len() {
            total - cumulative(total, weights, p)
        } else {
            cumulative(total, weights, p + 1) - cumulative(total, weights, p)
        }
    };
    let natural: Vec<u64> = (0..n).map(|p| steps_for(job, p, None, None)).collect();
    let mut out = Vec::with_capacity(n as usize);
    let (mut end_step, mut end_tokens) = (0u64, 0u64);
    for p in 0..n {
        let (steps, budget) = match (job.train.max_tokens, job.train.max_steps) {
            (Some(budget), _) => {
                let b = share(budget, &tokens, p as usize);
                (steps_for(job, p, Some(b.max(1)), None), Some(b))
            }
            // The worker refuses fewer steps than phases, so every phase gets one at least.
            (None, Some(max)) => (share(max, &natural, p as usize).max(1), None),
            (None, None) => (natural[p as usize], None),
        };
        end_step += steps;
        out.push(PhaseSpan {
            steps,
            end_step,
            end_tokens: budget.map(|b| {
                end_tokens += b;
                end_tokens
            }),
        });
    }
    out
}

/// Steps the run plans, over all its phases.
pub fn planned_steps(job: &TrainJob) -> u64 {
    phase_spans(job).last().map_or(1, |s| s.end_step)
}

/// The files of a checkpoint folder, each listed with its SHA-256 in [`CHECKSUMS`].
const CHECKPOINT_FILES: [&str; 3] = [
    "model.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
];

/// The checkpoint file that lists the others' SHA-256 digests, written last.
pub const CHECKSUMS: &str = "checksums.json";

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    use sha2::Digest;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Writes a checkpoint folder atomically: `model.safetensors`, `optimizer.safetensors`,
/// `trainer_state.json` and their SHA-256 digests in `checksums.json` are written in a temporary
/// folder beside `dir` and swapped in as a whole ([`crate::core::fsutil::write_dir_atomic`]; where
/// the system cannot swap, a checkpoint of the same name is moved aside to `.checkpoint-N.old`
/// for the instant between two renames, which [`recover_checkpoints`] puts back after a kill).
pub fn save_checkpoint(
    dir: &Path,
    weights: &[(String, Var)],
    opt: &AdamW,
    state: &TrainerState,
) -> anyhow::Result<()> {
    crate::core::fsutil::write_dir_atomic(dir, |tmp| {
        let w: HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&w, tmp.join("model.safetensors"))?;
        let o: HashMap<String, Tensor> = opt.state().into_iter().collect();
        candle_core::safetensors::save(&o, tmp.join("optimizer.safetensors"))?;
        std::fs::write(
            tmp.join("trainer_state.json"),
            serde_json::to_string_pretty(state)?,
        )?;
        let mut sums = serde_json::Map::new();
        for f in CHECKPOINT_FILES {
            sums.insert(f.to_string(), sha256_of(&tmp.join(f))?.into());
        }
        std::fs::write(tmp.join(CHECKSUMS), serde_json::to_string_pretty(&sums)?)?;
        Ok(())
    })
    .with_context(|| format!("writing {}", dir.display()))
}

/// Checks a checkpoint folder's files against `checksums.json`. Folders written before
/// checkpoints carried checksums have none and pass; a missing file or a digest that differs is
/// an error naming the file.
pub fn verify_checkpoint(dir: &Path) -> anyhow::Result<()> {
    let sums_path = dir.join(CHECKSUMS);
    let sums: serde_json::Map<String, serde_json::Value> = match std::fs::read_to_string(&sums_path)
    {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not a checksum list", sums_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return if CHECKPOINT_FILES.iter().all(|f| dir.join(f).is_file()) {
                Ok(())
            } else {
                anyhow::bail!("{} is incomplete: it has no {CHECKSUMS}", dir.display())
            };
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", sums_path.display())),
    };
    for f in CHECKPOINT_FILES {
        let path = dir.join(f);
        let want = sums
            .get(f)
            .and_then(|v| v.as_str())
            .with_context(|| format!("{} lists no checksum for {f}", sums_path.display()))?;
        if !path.is_file() {
            anyhow::bail!("{} is missing", path.display());
        }
        if sha256_of(&path)? != want {
            anyhow::bail!(
                "{} is corrupt: its contents do not match the checksum written with it",
                path.display()
            );
        }
    }
    Ok(())
}

/// A checkpoint's `trainer_state.json`: where the run was.
pub fn load_trainer_state(dir: &Path) -> anyhow::Result<TrainerState> {
    let path = dir.join("trainer_state.json");
    serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("reading {}", path.display()))
}

/// Restores weights and optimizer from a checkpoint folder (after checking its checksums);
/// returns where the run was.
pub fn load_checkpoint(
    dir: &Path,
    weights: &[(String, Var)],
    opt: &mut AdamW,
) -> anyhow::Result<TrainerState> {
    verify_checkpoint(dir)?;
    restore_checkpoint(dir, weights, opt)
}

/// As [`load_checkpoint`], for a folder already checked (see [`latest_good_checkpoint`]).
pub fn restore_checkpoint(
    dir: &Path,
    weights: &[(String, Var)],
    opt: &mut AdamW,
) -> anyhow::Result<TrainerState> {
    let state = load_trainer_state(dir)?;
    let device = weights
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu);
    let w = candle_core::safetensors::load(dir.join("model.safetensors"), &device)?;
    for (name, var) in weights {
        let t = w
            .get(name)
            .with_context(|| format!("checkpoint lacks {name} ({})", dir.display()))?;
        var.set(t)?;
    }
    let o = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &device)?;
    opt.load_state(&o, state.step)?;
    Ok(state)
}

/// Puts `out_dir`'s checkpoints in order after a kill: a checkpoint moved aside to be replaced
/// (`.checkpoint-N.old`) goes back when its replacement never arrived, and is removed when it
/// did; half-written temporary folders (`.checkpoint-…`, and `.model-…`, `.adapter-…`,
/// `.base-…` from the run's model folders) are removed.
pub fn recover_checkpoints(out_dir: &Path) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Half-written model, adapter and base folders (`write_dir_atomic`'s temporaries).
        if [".model-", ".adapter-", ".base-"]
            .iter()
            .any(|p| name.starts_with(p))
            && entry.path().is_dir()
        {
            std::fs::remove_dir_all(entry.path())?;
            continue;
        }
        let Some(rest) = name.strip_prefix(".checkpoint-") else {
            continue;
        };
        if !entry.path().is_dir() {
            continue;
        }
        match rest.strip_suffix(".old") {
            Some(step) if step.parse::<u64>().is_ok() => {
                let replaced = out_dir.join(format!("checkpoint-{step}"));
                if replaced.is_dir() {
                    std::fs::remove_dir_all(entry.path())?;
                } else {
                    std::fs::rename(entry.path(), replaced)?;
                }
            }
            _ => std::fs::remove_dir_all(entry.path())?,
        }
    }
    Ok(())
}

/// The newest checkpoint in `out_dir` whose files match their checksums, and why each newer
/// one was refused.
pub fn latest_good_checkpoint(out_dir: &Path) -> (Option<PathBuf>, Vec<String>) {
    let mut refused = Vec::new();
    for dir in checkpoints(out_dir).into_iter().rev() {
        match verify_checkpoint(&dir) {
            Ok(()) => return (Some(dir), refused),
            Err(e) => refused.push(format!("{e:#}")),
        }
    }
    (None, refused)
}

/// Runs training from `resume` (or the start) until the planned steps are done or `stop` is set.
/// Reports through `events`; obeys `commands` at step boundaries. Returns how it ended and the
/// final state.
pub fn train(
    job: &TrainJob,
    opt: &mut AdamW,
    resume: Option<TrainerState>,
    events: &mut EventSender,
    commands: &Receiver<TrainCommand>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<(Ending, TrainerState)> {
    let spans = phase_spans(job);
    let total_steps = spans.last().map_or(1, |s| s.end_step);
    let mut state = resume.unwrap_or(TrainerState {
        step: 0,
        epoch: 0,
        row: 0,
        total_steps,
        best_eval: None,
        evals_since_best: 0,
        tokens: 0,
        phase: 0,
        phase_step0: 0,
    });
    let device = job.model.device().clone();
    let vars: Vec<Var> = job.weights.iter().map(|(_, v)| v.clone()).collect();
    // A test hook, not a setting: the reliability tests poison the weights before this step to
    // see a run fail on a NaN and resume from its last good checkpoint.
    let fault_nan_at = std::env::var("MOI_TEST_NAN_AT_STEP")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    // Another test hook: `STEP:BYTES` makes that step ask for BYTES more memory, so the
    // memory-limit test can see a trainer process run out of memory mid-run.
    let fault_alloc_at = std::env::var("MOI_TEST_ALLOCATE_AT_STEP")
        .ok()
        .and_then(|s| {
            let (step, bytes) = s.split_once(':')?;
            Some((step.parse::<u64>().ok()?, bytes.parse::<usize>().ok()?))
        });
    let mut plan: PackPlan = job.pack_epoch(state.phase, state.epoch);
    let phases = job.phases.map_or(1, |p| p.parts.len() as u32);
    let phase_records = |p: u32| -> u64 {
        job.part(p)
            .tasks
            .iter()
            .map(|t| t.samples.len() as u64)
            .sum()
    };
    let phase_started = |state: &TrainerState| TrainEvent::PhaseStarted {
        phase: state.phase + 1,
        phases,
        step: state.step,
        tokens: state.tokens,
        records: phase_records(state.phase),
    };
    if job.phases.is_some() && state.step == state.phase_step0 {
        events.send(phase_started(&state))?;
    }
    // A phase is over once its steps (or its share of the token budget) are done.
    let phase_over = |state: &TrainerState| {
        let span = spans[(state.phase as usize).min(spans.len() - 1)];
        match span.end_tokens {
            Some(t) => state.tokens >= t,
            None => state.step >= span.end_step,
        }
    };
    let task_names: Vec<String> = job.prepared.tasks.iter().map(|t| t.name.clone()).collect();
    let started = Instant::now();
    let mut paused = false;
    let mut eval_now = false;
    let per_step = job.train.batch_rows.max(1);
    // With a token budget the budget ends the run (the planned steps only shape the schedule).
    let more = |state: &TrainerState| match job.train.max_tokens {
        Some(budget) => state.tokens < budget,
        None => state.step < total_steps,
    };
    while more(&state) {
        // Commands are taken between steps; while paused the worker waits for the next one.
        loop {
            let cmd = if paused {
                match commands.recv() {
                    Ok(c) => Some(c),
                    Err(_) => {
                        // Nobody can resume us any more.
                        stop.store(true, Ordering::SeqCst);
                        None
                    }
                }
            } else {
                commands.try_recv().ok()
            };
            let got = cmd.is_some();
            match cmd {
                Some(TrainCommand::Pause) => paused = true,
                Some(TrainCommand::Resume) => paused = false,
                Some(TrainCommand::Stop) => stop.store(true, Ordering::SeqCst),
                Some(TrainCommand::SaveCheckpoint) => save_and_report(job, opt, &state, events)?,
                Some(TrainCommand::EvalNow) if paused => {
                    run_eval(job, &mut state, events, stop)?;
                }
                Some(TrainCommand::EvalNow) => eval_now = true,
                Some(TrainCommand::Generate {
                    system,
                    prompt,
                    max_new_tokens,
                }) => {
                    let text = match job.chat {
                        Some(chat) => chat
                            .answer(job.model, &system, &prompt, max_new_tokens)
                            .unwrap_or_else(|e| format!("(no answer: {e:#})")),
                        None => "(this run cannot answer prompts)".to_string(),
                    };
                    events.send(TrainEvent::Generated {
                        step: state.step,
                        prompt,
                        text,
                    })?;
                }
                None => {}
            }
            if stop.load(Ordering::SeqCst) || (!paused && !got) {
                break;
            }
        }
        if eval_now && !stop.load(Ordering::SeqCst) {
            eval_now = false;
            run_eval(job, &mut state, events, stop)?;
        }
        if stop.load(Ordering::SeqCst) {
            save_and_report(job, opt, &state, events)?;
            return Ok((Ending::Stopped, state));
        }
        if job.phases.is_some() && state.phase + 1 < phases && phase_over(&state) {
            // The next phase continues from these weights and optimizer moments; a checkpoint
            // keeps each phase's model.
            events.send(TrainEvent::PhaseEnded {
                phase: state.phase + 1,
                step: state.step,
                tokens: state.tokens,
            })?;
            state.phase += 1;
            state.phase_step0 = state.step;
            state.epoch = 0;
            state.row = 0;
            plan = job.pack_epoch(state.phase, 0);
            events.send(phase_started(&state))?;
            // A checkpoint at the start of each phase keeps the previous phase's model.
            save_and_report(job, opt, &state, events)?;
        }
        let step_started = Instant::now();
        let mut loss_sum = 0f64;
        let mut tokens = 0usize;
        let mut grads_acc: Option<candle_core::backprop::GradStore> = None;
        if state.row >= plan.rows.len() {
            // A step never straddles two epochs, so the planned step count holds. Epochs past
            // the planned ones keep counting, each sampled with its own seed.
            state.epoch += 1;
            state.row = 0;
            plan = job.pack_epoch(state.phase, state.epoch);
        }
        if let Some((at, bytes)) = fault_alloc_at
            && at == state.step + 1
        {
            let held = vec![0u8; bytes];
            std::hint::black_box(&held);
        }
        if fault_nan_at == Some(state.step + 1) {
            for (_, var) in job.weights {
                var.set(&(var.as_tensor() * f64::NAN)?)?;
            }
        }
        // Micro-batches in this step: fewer at the end of an epoch. The loss is normalised over
        // the whole step, so accumulation equals one batch of all its rows.
        let accum = job
            .train
            .grad_accum
            .max(1)
            .min((plan.rows.len() - state.row).div_ceil(per_step).max(1));
        let step_end = (state.row + per_step * accum).min(plan.rows.len());
        let step_rows: Vec<_> = (state.row..step_end)
            .map(|i| job.part(state.phase).row(&plan, i, job.pack))
            .collect();
        state.row = step_end;
        let norm = StepNorm::of(&step_rows, job.train.loss_norm);
        let mut task_sums = TaskLossSums::default();
        for (micro, rows) in step_rows.chunks(per_step).enumerate() {
            let batch = make_step_batch(rows, &norm, &device)?;
            job.model
                .set_dropout_seed(job.seed ^ (state.step << 16) ^ micro as u64);
            tokens += batch.tokens;
            let (value, log_probs, grads) = batch_backward(job.model, &batch)?;
            task_sums.add(&batch, &log_probs.to_vec1::<f32>()?);
            let value = f64::from(value);
            if !value.is_finite() {
                anyhow::bail!(
                    "the loss became {value} at step {}; the last good checkpoint is kept",
                    state.step + 1
                );
            }
            loss_sum += value;
            let acc = grads_acc.get_or_insert_with(Default::default);
            accumulate_grads(acc, grads, &vars)?;
        }
        let Some(mut grads) = grads_acc else {
            anyhow::bail!("no batch could be built");
        };
        let grad_norm = clip_grad_norm(&mut grads, &vars, job.train.clip_grad_norm)?;
        if !grad_norm.is_finite() {
            anyhow::bail!(
                "the gradient norm became {grad_norm} at step {}; the last good checkpoint is kept",
                state.step + 1
            );
        }
        let (at, of) = match job.phases.map(|p| p.schedule) {
            Some(PhaseSchedule::Fresh) => (
                state.step - state.phase_step0,
                spans[(state.phase as usize).min(spans.len() - 1)].steps,
            ),
            _ => (state.step, total_steps),
        };
        let lr = lr_at(
            at,
            of,
            job.train.warmup_steps,
            job.train.lr,
            job.train.decay,
            job.train.min_lr_ratio,
        );
        opt.step(&grads, lr)?;
        state.step += 1;
        let tokens_before = state.tokens;
        state.tokens += tokens as u64;
        let secs = step_started.elapsed().as_secs_f64().max(1e-9);
        events.step(StepMetrics {
            step: state.step,
            epoch: f64::from(state.epoch) + state.row as f64 / plan.rows.len().max(1) as f64,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens_per_sec: tokens as f64 / secs,
            elapsed_s: started.elapsed().as_secs_f64(),
            tokens_seen: state.tokens,
            steps: 1,
            task_loss: task_sums.means(&task_names),
        });
        let every = job.train.eval_every_steps;
        let every_tokens = job.train.eval_every_tokens;
        let token_mark =
            every_tokens > 0 && tokens_before / every_tokens < state.tokens / every_tokens;
        if ((every > 0 && state.step.is_multiple_of(every)) || token_mark) && more(&state) {
            let patience = job.train.early_stopping_patience;
            if run_eval(job, &mut state, events, stop)?
                && patience > 0
                && state.evals_since_best >= patience
            {
                let _ = events.send(TrainEvent::Log {
                    message: format!(
                        "early stopping at step {}: the eval loss has not improved for {} \
                         evaluations (best {:.4})",
                        state.step,
                        state.evals_since_best,
                        state.best_eval.unwrap_or(f64::NAN)
                    ),
                });
                save_and_report(job, opt, &state, events)?;
                return Ok((Ending::EarlyStopped, state));
            }
        }
        let every = job.train.checkpoint_every;
        if every > 0 && state.step.is_multiple_of(every) && more(&state) {
            save_and_report(job, opt, &state, events)?;
        }
    }
    if job.phases.is_some() {
        events.send(TrainEvent::PhaseEnded {
            phase: state.phase + 1,
            step: state.step,
            tokens: state.tokens,
        })?;
    }
    run_eval(job, &mut state, events, stop)?;
    save_and_report(job, opt, &state, events)?;
    Ok((Ending::Finished, state))
}

/// Writes a checkpoint and reports it — unless a weight is no longer finite, in which case the
/// run fails and the checkpoints already on disk stay the last good ones.
fn save_and_report(
    job: &TrainJob,
    opt: &AdamW,
    state: &TrainerState,
    events: &mut EventSender,
) -> anyhow::Result<()> {
    for (name, var) in job.weights {
        let peak = var
            .as_tensor()
            .abs()?
            .max_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        if !peak.is_finite() {
            anyhow::bail!(
                "the weights became non-finite by step {} ({name}); not saving them, the last \
                 good checkpoint is kept",
                state.step
            );
        }
    }
    let dir = job.out_dir.join(format!("checkpoint-{}", state.step));
    if let Err(e) = save_checkpoint(&dir, job.weights, opt, state) {
        let kept = match latest_checkpoint(job.out_dir) {
            Some(previous) => format!("{} is kept", previous.display()),
            None => "there is no earlier checkpoint".to_string(),
        };
        return Err(e.context(format!(
            "could not write the checkpoint of step {} in {} (is the disk full?); {kept}",
            state.step,
            job.out_dir.display()
        )));
    }
    let _ = events.send(TrainEvent::Checkpoint {
        step: state.step,
        path: dir.display().to_string(),
    });
    Ok(())
}

/// Evaluates the held-out items (if the job has any), reports every result, and updates the
/// early-stopping record. Returns whether an evaluation ran to its end.
fn run_eval(
    job: &TrainJob,
    state: &mut TrainerState,
    events: &mut EventSender,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<bool> {
    let Some(set) = job.eval.filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    events.flush()?;
    let results = evaluate(job.model, set, state.step, &mut || {
        !stop.load(Ordering::SeqCst)
    })?;
    let complete = results.len()
        == set
            .tasks
            .iter()
            .map(|t| t.items.iter().filter(|i| !i.is_empty()).count())
            .sum::<usize>();
    for m in &results {
        events.send(TrainEvent::Eval(m.clone()))?;
    }
    if !complete {
        return Ok(false);
    }
    if let Some(loss) = watched_loss(&results) {
        if state.best_eval.is_none_or(|best| loss < best) {
            state.best_eval = Some(loss);
            state.evals_since_best = 0;
        } else {
            state.evals_since_best += 1;
        }
    }
    Ok(true)
}

/// The path of the newest checkpoint in `out_dir`, if any.
pub fn latest_checkpoint(out_dir: &Path) -> Option<PathBuf> {
    checkpoints(out_dir).pop()
}

/// The `checkpoint-N` folders in `out_dir`, oldest first.
fn checkpoints(out_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .filter(|(_, p)| p.is_dir())
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}
