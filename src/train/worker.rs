//! The training worker: a named thread that reads the project's data, builds or loads the model,
//! trains, and writes `runs/<run-id>/` — the project it ran with, `metrics.jsonl` (every event),
//! checkpoints, the final model folder and `summary.json`. The UI and the CLI are two listeners of
//! the same events.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use crossbeam_channel::{Receiver, Sender, bounded};
use serde_json::json;

use crate::core::dataset::TaskData;
use crate::core::dataset::load_project;
use crate::core::events::{EventSender, TrainCommand, TrainEvent, Wake, event_channel};
use crate::core::fsutil::write_atomic;
use crate::core::mixing::{BUILTIN_VOCAB, Prepared, load_template, load_tokenizer};
use crate::core::packing::PackMode;
use crate::core::project::Project;
use crate::core::template::ChatTemplate;
use crate::train::chat::Chat;
use crate::train::device::choose_device;
use crate::train::eval::EvalSet;
use crate::train::export::{save_model_folder_atomic, save_peft_adapter_atomic, tensors_of};
use crate::train::memory;
use crate::train::model::{Decoder, init_lora, init_weights, merge_lora, named_vars};
use crate::train::optim::AdamW;
use crate::train::phased;
use crate::train::score::load_bundle;
use crate::train::tiny::{tiny_config, tiny_config_sized};
use crate::train::trainer::{
    Ending, TrainJob, latest_good_checkpoint, load_trainer_state, planned_steps,
    recover_checkpoints, restore_checkpoint, train,
};

/// Which model a run trains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelChoice {
    /// The built-in tiny model, created for the project.
    Tiny,
    /// A Hugging Face folder or a .gguf file.
    Path(PathBuf),
}

/// The longest sequence `model` reads, from its config or metadata alone (no weights loaded):
/// what the trainer cuts rows to, for previews that must show the rows it trains on.
pub fn model_context(model: &ModelChoice) -> anyhow::Result<usize> {
    match model {
        ModelChoice::Tiny => Ok(tiny_config(256)?.max_position_embeddings),
        ModelChoice::Path(path)
            if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf")) =>
        {
            crate::train::gguf::gguf_context_length(path)
        }
        ModelChoice::Path(path) => Ok(crate::train::config::ModelConfig::load(
            &path.join("config.json"),
        )?
        .max_position_embeddings),
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The project, as it is now.
    pub project: Project,
    /// The model.
    pub model: ModelChoice,
    /// Packing mode, overriding the project's.
    pub mode: Option<PackMode>,
    /// Steps, overriding the project's.
    pub max_steps: Option<u64>,
    /// The folder runs go in (`runs/` beside the project by default).
    pub runs_dir: PathBuf,
    /// Train on the CPU even when a GPU is there.
    pub force_cpu: bool,
    /// LoRA on or off, overriding the project's `training.lora.enabled`.
    pub lora: Option<bool>,
    /// Continue the run in this folder from its newest checkpoint instead of starting a new one
    /// (`project` and `model` should be the ones it ran with: see [`resume_spec`]).
    pub resume: Option<PathBuf>,
    /// The new run's folder name in `runs_dir` (default: its start time and a random part).
    pub name: Option<String>,
    /// When resuming, first send the listener the events the run recorded up to its checkpoint
    /// (not written again), so a window that opens the run again shows its whole curves.
    pub replay_history: bool,
}

impl RunSpec {
    /// A new run of `project` with `model`, its settings as they are, in `runs/` beside the
    /// project.
    pub fn new(project: Project, model: ModelChoice) -> Self {
        let runs_dir = project.runs_dir();
        Self {
            project,
            model,
            mode: None,
            max_steps: None,
            runs_dir,
            force_cpu: false,
            lora: None,
            resume: None,
            name: None,
            replay_history: false,
        }
    }
}

/// What `run.json` records about a run, written when it starts.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    /// "tiny" or the model's absolute path.
    pub model: String,
    /// Whether it trains LoRA adapters.
    pub lora: bool,
    /// Whether the CPU was forced.
    pub force_cpu: bool,
}

/// The spec that continues the run in `run_dir`: its own project snapshot and model.
pub fn resume_spec(run_dir: &Path) -> anyhow::Result<RunSpec> {
    let info: RunInfo = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("run.json"))
            .with_context(|| format!("{} is not a run folder (no run.json)", run_dir.display()))?,
    )
    .with_context(|| format!("reading {}", run_dir.join("run.json").display()))?;
    let project = Project::load(&run_dir.join("project.moi.toml"))?;
    let model = if info.model == "tiny" {
        ModelChoice::Tiny
    } else {
        ModelChoice::Path(PathBuf::from(info.model))
    };
    let mut spec = RunSpec::new(project, model);
    spec.force_cpu = info.force_cpu;
    spec.resume = Some(run_dir.to_path_buf());
    Ok(spec)
}

/// A running worker.
pub struct TrainHandle {
    /// Events, in order.
    pub events: Receiver<TrainEvent>,
    /// Commands to the worker.
    pub commands: Sender<TrainCommand>,
    /// Set to stop at the next step boundary (after a checkpoint).
    pub stop: Arc<AtomicBool>,
    /// The run's folder.
    pub run_dir: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl TrainHandle {
    pub(crate) fn new(
        events: Receiver<TrainEvent>,
        commands: Sender<TrainCommand>,
        stop: Arc<AtomicBool>,
        run_dir: PathBuf,
        thread: JoinHandle<()>,
    ) -> Self {
        Self {
            events,
            commands,
            stop,
            run_dir,
            thread: Some(thread),
        }
    }

    /// Waits for the worker thread to end.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A new run id: the time and a short random part, so runs sort by age.
fn run_id() -> String {
    let now = jiff::Zoned::now();
    format!(
        "{}-{:04x}",
        now.strftime("%Y%m%d-%H%M%S"),
        rand::random::<u16>()
    )
}

/// The folder `spec` runs in: the one it resumes, or a new one in its runs folder (named by
/// `spec.name`, or by the time and a random part).
pub(crate) fn run_dir_of(spec: &RunSpec) -> PathBuf {
    match &spec.resume {
        Some(dir) => dir.clone(),
        None => spec.runs_dir.join(spec.name.clone().unwrap_or_else(run_id)),
    }
}

/// Starts a run on a named thread. Events go to the returned handle (bounded channel, steps
/// merged rather than dropped when the listener is slow) and to `metrics.jsonl`.
pub fn spawn_run(spec: RunSpec, wake: Wake) -> anyhow::Result<TrainHandle> {
    let run_dir = run_dir_of(&spec);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let (mut events, rx) = event_channel(256, wake);
    let (cmd_tx, cmd_rx) = bounded(16);
    let stop = Arc::new(AtomicBool::new(false));
    let worker_stop = stop.clone();
    let dir = run_dir.clone();
    let thread = std::thread::Builder::new()
        .name("trainer".to_string())
        .spawn(move || {
            // A panic inside candle or our code still ends the run with a message.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let resume = open_metrics(&spec, &dir, &mut events)?;
                run_worker(&spec, &dir, &mut events, &cmd_rx, &worker_stop, resume)
            }));
            let last = match result {
                Ok(Ok(e)) => e,
                Ok(Err(e)) => TrainEvent::Failed {
                    error: format!("{e:#}"),
                },
                Err(panic) => TrainEvent::Failed {
                    error: format!(
                        "internal error: {}",
                        panic
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or_else(|| panic.downcast_ref::<&str>().copied())
                            .unwrap_or("the trainer panicked")
                    ),
                },
            };
            let _ = events.send(last);
        })
        .context("starting the trainer thread")?;
    Ok(TrainHandle {
        events: rx,
        commands: cmd_tx,
        stop,
        run_dir,
        thread: Some(thread),
    })
}

/// Opens the run's `metrics.jsonl` for its events. A new run starts it afresh. A resumed run
/// picks the newest checkpoint whose checksums hold (saying why it refused any newer one),
/// cuts the metrics back to that checkpoint's step — what a killed run logged after it is
/// trained again — and appends, so every step is in the file once.
fn open_metrics(
    spec: &RunSpec,
    run_dir: &Path,
    events: &mut EventSender,
) -> anyhow::Result<Option<PathBuf>> {
    let path = run_dir.join("metrics.jsonl");
    let Some(dir) = &spec.resume else {
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        events.record_to(Box::new(BufWriter::new(file)));
        return Ok(None);
    };
    recover_checkpoints(dir).with_context(|| format!("tidying {}", dir.display()))?;
    let (checkpoint, refused) = latest_good_checkpoint(dir);
    let step = match &checkpoint {
        Some(c) => load_trainer_state(c)?.step,
        None => 0,
    };
    if checkpoint.is_some() && path.is_file() {
        crate::core::runs::cut_metrics(&path, step)
            .with_context(|| format!("cutting {} back to step {step}", path.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if spec.replay_history {
        replay_kept(&path, events);
    }
    events.record_to(Box::new(BufWriter::new(file)));
    for why in &refused {
        log(events, format!("refusing a checkpoint: {why}"));
    }
    match checkpoint {
        Some(c) => {
            if !refused.is_empty() {
                log(events, format!("using the previous one, {}", c.display()));
            }
            Ok(Some(c))
        }
        None if refused.is_empty() => {
            anyhow::bail!("{} has no checkpoint to resume", dir.display())
        }
        None => anyhow::bail!(
            "{} has no usable checkpoint to resume: {}",
            dir.display(),
            refused.join("; ")
        ),
    }
}

/// Sends the listener what `metrics.jsonl` holds (already cut back to the checkpoint), but for
/// how the earlier session ended: the run goes on.
fn replay_kept(path: &Path, events: &mut EventSender) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    for line in text.lines() {
        if let Ok(event) = serde_json::from_str::<TrainEvent>(line)
            && !event.is_terminal()
            && events.replay(event).is_err()
        {
            return;
        }
    }
}

fn log(events: &mut EventSender, message: impl Into<String>) {
    let _ = events.send(TrainEvent::Log {
        message: message.into(),
    });
}

/// A model ready to train: the decoder, its weights split into frozen and trained, and the
/// tokenizer and template that go with it.
struct Parts {
    model: Decoder,
    config: crate::train::config::ModelConfig,
    /// Frozen base weights (LoRA) — empty for full fine-tuning, where every weight trains.
    base: Vec<(String, Tensor)>,
    /// The trained variables.
    trainable: Vec<(String, Var)>,
    tokenizer: tokenizers::Tokenizer,
    template: ChatTemplate,
    eos: String,
}

/// A model as it is before training: its config, weights (as variables), tokenizer and template.
pub(crate) struct Base {
    pub config: crate::train::config::ModelConfig,
    pub weights: Vec<(String, Var)>,
    pub tokenizer: tokenizers::Tokenizer,
    pub template: ChatTemplate,
}

/// Builds the built-in model for `project` (seeded weights; its tokenizer trained on the data,
/// or read from `tokenizer_file`) or loads a Hugging Face folder or GGUF file.
pub(crate) fn load_base(
    model: &ModelChoice,
    project: &Project,
    data: &[TaskData],
    device: &Device,
    tokenizer_file: Option<&Path>,
    say: &mut dyn FnMut(String),
) -> anyhow::Result<Base> {
    match model {
        ModelChoice::Tiny => {
            let tokenizer = if let Some(saved) = tokenizer_file {
                say(format!("reading the run's tokenizer {}", saved.display()));
                tokenizers::Tokenizer::from_file(saved)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", saved.display()))?
            } else {
                say(format!(
                    "training the built-in tokenizer ({BUILTIN_VOCAB} tokens)"
                ));
                load_tokenizer(project, &project.mixing, data)?
            };
            let config = tiny_config_sized(tokenizer.get_vocab_size(true), project.training.tiny)?;
            let weights = named_vars(&init_weights(&config, project.seed, device)?);
            let template = load_template(project, &project.mixing)?;
            Ok(Base {
                config,
                weights,
                tokenizer,
                template,
            })
        }
        ModelChoice::Path(path) => {
            say(format!("loading {}", path.display()));
            let bundle = load_bundle(path, device)?;
            let weights = named_vars(&bundle.loaded.weights);
            let template = bundle.template()?;
            Ok(Base {
                config: bundle.loaded.config,
                weights,
                tokenizer: bundle.tokenizer,
                template,
            })
        }
    }
}

/// The token that ends an answer: the template's EOS, or its end-of-turn marker.
pub(crate) fn eos_of(template: &ChatTemplate) -> String {
    if template.eos_token.is_empty() {
        template.end_of_turn.trim().to_string()
    } else {
        template.eos_token.clone()
    }
}

/// Builds or loads the model; with LoRA the base is frozen (plain tensors) and only seeded
/// adapters are variables.
fn build_parts(
    spec: &RunSpec,
    run_dir: &Path,
    project: &Project,
    data: &[TaskData],
    device: &Device,
    events: &mut EventSender,
) -> anyhow::Result<Parts> {
    // The run keeps the tokenizer it trained, so a resume reads the same token ids even when
    // the data has changed since.
    let saved = run_dir.join("tokenizer.json");
    let keep = (spec.resume.is_some() && saved.is_file()).then_some(saved.as_path());
    let Base {
        config,
        weights,
        tokenizer,
        template,
    } = load_base(&spec.model, project, data, device, keep, &mut |m| {
        log(events, m)
    })?;
    if spec.model == ModelChoice::Tiny && keep.is_none() {
        let text = tokenizer
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
        write_atomic(&saved, text.as_bytes())?;
    }
    let eos = eos_of(&template);
    let lora = &project.training.lora;
    if !lora.enabled {
        let mut model = Decoder::new(&config, var_builder(&weights, device))?;
        model.set_kernels(project.training.kernels);
        return Ok(Parts {
            model,
            config,
            base: Vec::new(),
            trainable: weights,
            tokenizer,
            template,
            eos,
        });
    }
    let base: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
        .collect();
    let adapters = init_lora(&config, lora, project.seed, device)?;
    let mut model = Decoder::with_lora(
        &config,
        VarBuilder::from_tensors(base.iter().cloned().collect(), DType::F32, device),
        lora,
        VarBuilder::from_varmap(&adapters, DType::F32, device),
    )?;
    model.set_kernels(project.training.kernels);
    Ok(Parts {
        model,
        config,
        base,
        trainable: named_vars(&adapters),
        tokenizer,
        template,
        eos,
    })
}

/// A builder that hands out the given variables (so the decoder trains them).
pub(crate) fn var_builder<'a>(weights: &[(String, Var)], device: &Device) -> VarBuilder<'a> {
    let map = candle_nn::VarMap::new();
    if let Ok(mut data) = map.data().lock() {
        data.extend(weights.iter().cloned());
    }
    VarBuilder::from_varmap(&map, DType::F32, device)
}

fn run_worker(
    spec: &RunSpec,
    run_dir: &Path,
    events: &mut EventSender,
    commands: &Receiver<TrainCommand>,
    stop: &Arc<AtomicBool>,
    resume_from: Option<PathBuf>,
) -> anyhow::Result<TrainEvent> {
    let mut project = spec.project.clone();
    if let Some(mode) = spec.mode {
        project.packing.mode = mode;
    }
    if let Some(steps) = spec.max_steps {
        project.training.max_steps = Some(steps);
    }
    if let Some(lora) = spec.lora {
        project.training.lora.enabled = lora;
    }
    if spec.resume.is_none() {
        project
            .clone()
            .save(&run_dir.join("project.moi.toml"))
            .context("saving the run's project")?;
        let info = RunInfo {
            model: match &spec.model {
                ModelChoice::Tiny => "tiny".to_string(),
                ModelChoice::Path(p) => std::path::absolute(p)
                    .unwrap_or_else(|_| p.clone())
                    .display()
                    .to_string(),
            },
            lora: project.training.lora.enabled,
            force_cpu: spec.force_cpu,
        };
        write_atomic(
            &run_dir.join("run.json"),
            serde_json::to_string_pretty(&info)?.as_bytes(),
        )?;
    }
    log(events, "reading the tasks' data");
    let data = load_project(&project, &mut |_| {});
    let records: usize = data.iter().map(|d| d.records.len()).sum();
    if records == 0 {
        anyhow::bail!("the project has no records to train on");
    }
    let device = choose_device(spec.force_cpu);
    let mut parts = build_parts(spec, run_dir, &project, &data, &device.device, events)?;
    let config = &parts.config;

    log(events, "tokenizing");
    let prepared = Prepared::build(
        &project,
        &data,
        &parts.tokenizer,
        &parts.template,
        project.mixing.labels,
    )?;
    let mut pack = project.packing.clone();
    if let Some(note) = pack.fit_context(config.max_position_embeddings) {
        log(events, note);
    }
    prepared.check_fits(&pack)?;
    let mut eval_set = EvalSet::build(
        &project,
        &data,
        &parts.tokenizer,
        &parts.template,
        project.training.eval_items,
        project.training.eval_generate,
        config.max_position_embeddings,
    );

    let count = |w: &[(String, Var)]| w.iter().map(|(_, v)| v.elem_count() as u64).sum::<u64>();
    let trainable = count(&parts.trainable);
    let parameters = trainable
        + parts
            .base
            .iter()
            .map(|(_, t)| t.elem_count() as u64)
            .sum::<u64>();
    let chat = Chat {
        tokenizer: &parts.tokenizer,
        template: &parts.template,
    };
    // Memory is planned before the first step: lower the micro-batch, or refuse with the numbers,
    // rather than be killed half-way.
    let lora_settings = &project.training.lora;
    let tasks = &prepared.tasks;
    let trained_share = memory::trained_share(
        tasks.iter().map(|t| t.trained_tokens()).sum(),
        tasks.iter().map(|t| t.tokens()).sum(),
    );
    let shape = memory::RunShape {
        config,
        trainable,
        lora: lora_settings.enabled.then_some(lora_settings),
        fused: parts.model.fused(),
        checkpointing: project.training.activation_checkpointing,
        trained_share,
    };
    let plan = memory::plan(
        &shape,
        project.training.batch_rows,
        project.training.grad_accum,
        pack.max_seq_len,
        (
            memory::resident_bytes().0,
            // Writing the model folder: a copy of the weights (merged with the adapters under
            // LoRA) and, under LoRA, the bytes of the largest tensor being written (measured on
            // SmolLM2-135M: 640 MiB over the resident part, against 516 + 108 planned).
            parameters * 4
                + if lora_settings.enabled {
                    4 * parts
                        .base
                        .iter()
                        .map(|(_, t)| t.elem_count() as u64)
                        .max()
                        .unwrap_or(0)
                } else {
                    0
                },
        ),
        memory::available_bytes(),
    )?;
    log(events, memory::summary(&plan));
    if let Some(note) = &plan.note {
        log(events, note.clone());
    }
    let mut training = project.training.clone();
    parts.model.set_activation_checkpointing(plan.checkpointing);
    training.activation_checkpointing = plan.checkpointing;
    training.batch_rows = plan.batch_rows;
    training.grad_accum = plan.grad_accum;
    eval_set.batch_tokens = plan.batch_rows * pack.max_seq_len;
    // Phases are cut before any checkpoint is loaded, so a resumed run scores (and, for the
    // loss difficulty, measures) its records exactly as the run did when it started.
    let phase_settings = &project.training.phases;
    let phased = if phase_settings.is_off() {
        None
    } else {
        if phase_settings.difficulty == crate::core::phases::Difficulty::Loss {
            log(
                events,
                format!(
                    "scoring {} training records by the model's loss",
                    prepared
                        .tasks
                        .iter()
                        .map(|t| t.samples.len())
                        .sum::<usize>()
                ),
            );
        }
        let (scores, unscored) = phased::difficulty_scores(
            phase_settings,
            &prepared,
            &data,
            &parts.model,
            eval_set.batch_tokens,
            &mut |m| log(events, m),
        )?;
        let built =
            phased::build_phases(phase_settings, &prepared, &scores, unscored, project.seed);
        let count = built.0.parts.len() as u64;
        if let Some(steps) = training.max_steps.filter(|&s| s < count) {
            anyhow::bail!("{count} phases need {count} steps at least; the run has {steps}");
        }
        Some(built)
    };
    let job = TrainJob {
        model: &parts.model,
        weights: &parts.trainable,
        prepared: &prepared,
        mix: &project.mixing,
        pack: &pack,
        train: &training,
        seed: project.seed,
        out_dir: run_dir,
        eval: Some(&eval_set),
        chat: Some(&chat),
        phases: phased.as_ref().map(|(p, _)| p),
    };
    let total_steps = planned_steps(&job);
    let mut opt = AdamW::new(parts.trainable.clone(), project.training.adamw)?;
    let resume = match resume_from {
        Some(checkpoint) => {
            // `open_metrics` chose it after checking its checksums.
            let state = restore_checkpoint(&checkpoint, &parts.trainable, &mut opt)?;
            log(
                events,
                format!(
                    "resuming from {} (step {})",
                    checkpoint.display(),
                    state.step
                ),
            );
            Some(state)
        }
        None => None,
    };
    events.send(TrainEvent::Started {
        device: device.name.clone(),
        device_reason: device.reason.clone(),
        parameters,
        trainable,
        total_steps,
        kernels: parts.model.kernels_in_use(),
    })?;
    if let Some((_, report)) = &phased {
        let sizes: Vec<String> = report.records.iter().map(u64::to_string).collect();
        log(
            events,
            format!(
                "{}: {} records per phase{}",
                report.by,
                sizes.join(" / "),
                if report.unscored > 0 {
                    format!(
                        "; {} records had no score and count at their task's median",
                        report.unscored
                    )
                } else {
                    String::new()
                }
            ),
        );
        events.send(TrainEvent::Difficulty(report.clone()))?;
    }
    log(
        events,
        format!(
            "{} held-out items across {} tasks, each under its own and the default prompt",
            eval_set.len() / 2,
            eval_set.tasks.len()
        ),
    );
    let (ending, state) = train(&job, &mut opt, resume, events, commands, stop)?;
    events.flush()?;
    log(events, "writing the model folder");
    let lora = &project.training.lora;
    let trained = tensors_of(&parts.trainable);
    let weights = if lora.enabled {
        // The adapter needs a base PEFT can load: the built-in model's seeded weights, or a
        // GGUF's dequantized weights, are written beside it as a Hugging Face folder.
        let is_gguf = |p: &Path| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        };
        let base_path = match &spec.model {
            ModelChoice::Path(p) if !is_gguf(p) => p.clone(),
            _ => {
                let dir = run_dir.join("base");
                save_model_folder_atomic(
                    &dir,
                    config,
                    &parts.base,
                    &parts.tokenizer,
                    &parts.template.source,
                    &parts.template.bos_token,
                    &parts.eos,
                )?;
                dir
            }
        };
        let base_path = std::path::absolute(&base_path).unwrap_or(base_path);
        save_peft_adapter_atomic(
            &run_dir.join("adapter"),
            &trained,
            lora,
            &base_path.display().to_string(),
        )?;
        merge_lora(&parts.base, &trained, lora)?
    } else {
        trained
    };
    save_model_folder_atomic(
        &run_dir.join("model"),
        config,
        &weights,
        &parts.tokenizer,
        &parts.template.source,
        &parts.template.bos_token,
        &parts.eos,
    )?;
    let (_, peak) = memory::resident_bytes();
    log(
        events,
        format!(
            "memory: peak {:.0} MiB (planned {:.0} MiB)",
            peak as f64 / 1048576.0,
            plan.peak() as f64 / 1048576.0
        ),
    );
    // The run's own record of what it reported, for the final numbers.
    let history = crate::core::runs::RunHistory::load(run_dir)
        .map(|(h, _)| h)
        .unwrap_or_default();
    let summary = json!({
        "ending": match ending {
            Ending::Finished => "finished",
            Ending::Stopped => "stopped",
            Ending::EarlyStopped => "early_stopped",
        },
        "steps": state.step,
        "total_steps": total_steps,
        "device": device.name,
        "parameters": parameters,
        "trainable": trainable,
        "lora": lora.enabled,
        "model": match &spec.model { ModelChoice::Tiny => "tiny".to_string(), ModelChoice::Path(p) => p.display().to_string() },
        "mode": pack.mode,
        "phases": project.training.phases.describe(),
        "best_eval_loss": state.best_eval,
        "memory": {
            "planned_peak_bytes": plan.peak(),
            "peak_bytes": peak,
            "batch_rows": plan.batch_rows,
            "grad_accum": plan.grad_accum,
            "activation_checkpointing": plan.checkpointing,
        },
        "final_loss": history.loss.last().map(|p| p[1]),
        "final_eval": history.latest_eval,
        "training": project.training,
        "packing": pack,
    });
    write_atomic(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    stop.store(false, Ordering::SeqCst);
    Ok(match ending {
        Ending::Finished | Ending::EarlyStopped => TrainEvent::Finished { step: state.step },
        Ending::Stopped => TrainEvent::Stopped { step: state.step },
    })
}
