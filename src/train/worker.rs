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
use candle_core::DType;
use candle_nn::VarBuilder;
use crossbeam_channel::{Receiver, Sender, bounded};
use serde_json::json;

use crate::core::dataset::load_project;
use crate::core::events::{EventSender, TrainCommand, TrainEvent, Wake, event_channel};
use crate::core::fsutil::write_atomic;
use crate::core::mixing::{BUILTIN_VOCAB, Prepared, load_template, load_tokenizer};
use crate::core::packing::PackMode;
use crate::core::project::Project;
use crate::core::template::ChatTemplate;
use crate::train::device::choose_device;
use crate::train::export::{CHATML_JINJA, save_model_folder};
use crate::train::model::{Decoder, init_weights, named_vars};
use crate::train::optim::AdamW;
use crate::train::score::load_bundle;
use crate::train::tiny::tiny_config;
use crate::train::trainer::{Ending, TrainJob, train};

/// Which model a run trains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelChoice {
    /// The built-in tiny model, created for the project.
    Tiny,
    /// A Hugging Face folder or a .gguf file.
    Path(PathBuf),
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

/// Starts a run on a named thread. Events go to the returned handle (bounded channel, steps
/// merged rather than dropped when the listener is slow) and to `metrics.jsonl`.
pub fn spawn_run(spec: RunSpec, wake: Wake) -> anyhow::Result<TrainHandle> {
    let run_dir = spec.runs_dir.join(run_id());
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let (mut events, rx) = event_channel(256, wake);
    let log = std::fs::File::create(run_dir.join("metrics.jsonl"))?;
    events.record_to(Box::new(BufWriter::new(log)));
    let (cmd_tx, cmd_rx) = bounded(16);
    let stop = Arc::new(AtomicBool::new(false));
    let worker_stop = stop.clone();
    let dir = run_dir.clone();
    let thread = std::thread::Builder::new()
        .name("trainer".to_string())
        .spawn(move || {
            let result = run_worker(&spec, &dir, &mut events, &cmd_rx, &worker_stop);
            let last = match result {
                Ok(e) => e,
                Err(e) => TrainEvent::Failed {
                    error: format!("{e:#}"),
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

fn log(events: &mut EventSender, message: impl Into<String>) {
    let _ = events.send(TrainEvent::Log {
        message: message.into(),
    });
}

fn run_worker(
    spec: &RunSpec,
    run_dir: &Path,
    events: &mut EventSender,
    commands: &Receiver<TrainCommand>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<TrainEvent> {
    let mut project = spec.project.clone();
    if let Some(mode) = spec.mode {
        project.packing.mode = mode;
    }
    if let Some(steps) = spec.max_steps {
        project.training.max_steps = Some(steps);
    }
    write_atomic(
        &run_dir.join("project.moi.toml"),
        project.to_toml().as_bytes(),
    )?;
    log(events, "reading the tasks' data");
    let data = load_project(&project, &mut |_| {});
    let records: usize = data.iter().map(|d| d.records.len()).sum();
    if records == 0 {
        anyhow::bail!("the project has no records to train on");
    }
    let device = choose_device(spec.force_cpu);

    // The model, its weights and the tokenizer and template that go with it.
    let (model, config, weights, tokenizer, template_source, eos) = match &spec.model {
        ModelChoice::Tiny => {
            log(
                events,
                format!("training the built-in tokenizer ({BUILTIN_VOCAB} tokens)"),
            );
            let tokenizer = load_tokenizer(&project, &project.mixing, &data)?;
            let config = tiny_config(tokenizer.get_vocab_size(true))?;
            let varmap = init_weights(&config, project.seed, &device.device)?;
            let model = Decoder::new(
                &config,
                VarBuilder::from_varmap(&varmap, DType::F32, &device.device),
            )?;
            let weights = named_vars(&varmap);
            (
                model,
                config,
                weights,
                tokenizer,
                CHATML_JINJA.to_string(),
                "<|im_end|>".to_string(),
            )
        }
        ModelChoice::Path(path) => {
            log(events, format!("loading {}", path.display()));
            let bundle = load_bundle(path, &device.device)?;
            let weights = named_vars(&bundle.loaded.weights);
            let template = bundle
                .chat_template
                .clone()
                .unwrap_or_else(|| CHATML_JINJA.to_string());
            let eos = bundle
                .loaded
                .config
                .eos_token_id
                .as_ref()
                .and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(|x| x.as_u64())))
                .and_then(|id| bundle.tokenizer.id_to_token(id as u32))
                .unwrap_or_else(|| "<|im_end|>".to_string());
            (
                bundle.loaded.model,
                bundle.loaded.config,
                weights,
                bundle.tokenizer,
                template,
                eos,
            )
        }
    };
    let template = match &spec.model {
        ModelChoice::Tiny => load_template(&project, &project.mixing)?,
        ModelChoice::Path(_) => ChatTemplate::from_source(&template_source, "", &eos)?,
    };
    log(events, "tokenizing");
    let prepared = Prepared::build(
        &project,
        &data,
        &tokenizer,
        &template,
        project.mixing.labels,
    )?;
    let mut pack = project.packing.clone();
    if pack.max_seq_len > config.max_position_embeddings {
        log(
            events,
            format!(
                "rows cut to {} tokens, the model's longest sequence (packing.max_seq_len is {})",
                config.max_position_embeddings, pack.max_seq_len
            ),
        );
        pack.max_seq_len = config.max_position_embeddings;
    }
    prepared.check_fits(&pack)?;

    let parameters: u64 = weights.iter().map(|(_, v)| v.elem_count() as u64).sum();
    let job = TrainJob {
        model: &model,
        weights: &weights,
        prepared: &prepared,
        mix: &project.mixing,
        pack: &pack,
        train: &project.training,
        seed: project.seed,
        out_dir: run_dir,
    };
    let total_steps = crate::train::trainer::planned_steps(&job);
    events.send(TrainEvent::Started {
        device: device.name.clone(),
        device_reason: device.reason.clone(),
        parameters,
        trainable: parameters,
        total_steps,
    })?;
    let mut opt = AdamW::new(weights.clone(), project.training.adamw)?;
    let (ending, state) = train(&job, &mut opt, None, events, commands, stop)?;
    events.flush()?;
    log(events, "writing the model folder");
    save_model_folder(
        &run_dir.join("model"),
        &config,
        &weights,
        &tokenizer,
        &template_source,
        &eos,
    )?;
    let summary = json!({
        "ending": match ending { Ending::Finished => "finished", Ending::Stopped => "stopped" },
        "steps": state.step,
        "total_steps": total_steps,
        "device": device.name,
        "parameters": parameters,
        "model": match &spec.model { ModelChoice::Tiny => "tiny".to_string(), ModelChoice::Path(p) => p.display().to_string() },
        "mode": pack.mode,
    });
    write_atomic(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    stop.store(false, Ordering::SeqCst);
    Ok(match ending {
        Ending::Finished => TrainEvent::Finished { step: state.step },
        Ending::Stopped => TrainEvent::Stopped { step: state.step },
    })
}
