//! `moi-studio train PROJECT`: a run in the terminal, with a progress bar or JSON events.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Args;

use crate::core::events::TrainEvent;
use crate::core::packing::PackMode;
use crate::core::project::Project;
use crate::train::worker::{ModelChoice, RunSpec, resume_spec, spawn_run};

/// Arguments of `train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The project file (not needed with --resume).
    #[arg(required_unless_present = "resume")]
    pub project: Option<PathBuf>,
    /// Continue a run folder from its newest checkpoint (its own project and model).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["mode", "model", "lora"])]
    pub resume: Option<PathBuf>,
    /// Train LoRA adapters (rank, alpha, targets from the project's [training.lora]).
    #[arg(long)]
    pub lora: bool,
    /// Packing mode (default: the project's).
    #[arg(long)]
    pub mode: Option<PackMode>,
    /// "tiny" for the built-in model, or a Hugging Face folder or .gguf file (default: the
    /// project's `training.model`, else tiny).
    #[arg(long)]
    pub model: Option<String>,
    /// Optimizer steps (default: the project's epochs).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Folder for runs (default: runs/ beside the project; the bundled presets' runs go to the
    /// user's data directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Train on the CPU even when a GPU is there.
    #[arg(long)]
    pub cpu: bool,
    /// Print one JSON event per line (the events the studio gets).
    #[arg(long)]
    pub json: bool,
    /// Train in this many phases of rising difficulty (Phased IFT; 1 = one-off).
    #[arg(long, value_name = "N", conflicts_with = "resume")]
    pub phases: Option<u32>,
    /// What difficulty is measured by: length (answer tokens), column:NAME (a numeric field of
    /// the source records) or loss (the model's loss before training).
    #[arg(long, value_name = "BY", conflicts_with = "resume")]
    pub difficulty: Option<crate::core::phases::Difficulty>,
    /// Each phase warms up and decays its learning rate again (default: one schedule).
    #[arg(long, conflicts_with = "resume")]
    pub fresh_schedule: bool,
    /// The control: phases of the same sizes with records assigned at random.
    #[arg(long, conflicts_with = "resume")]
    pub random_phases: bool,
}

impl TrainArgs {
    /// Applies the phase options to the project's `[training.phases]`.
    fn apply_phases(&self, project: &mut Project) -> anyhow::Result<()> {
        let phases = &mut project.training.phases;
        if let Some(n) = self.phases {
            anyhow::ensure!((1..=10).contains(&n), "--phases {n}: give 1 to 10");
            phases.count = n;
        }
        if let Some(d) = &self.difficulty {
            phases.difficulty = d.clone();
        }
        if self.fresh_schedule {
            phases.schedule = crate::core::phases::PhaseSchedule::Fresh;
        }
        if self.random_phases {
            phases.random = true;
        }
        let asked = self.difficulty.is_some() || self.fresh_schedule || self.random_phases;
        anyhow::ensure!(
            !asked || !phases.is_off(),
            "--difficulty, --fresh-schedule and --random-phases need --phases 2 or more"
        );
        Ok(())
    }
}

/// A line above the bar, or on stderr when the bar is hidden (not a terminal).
fn say(bar: &indicatif::ProgressBar, line: impl AsRef<str>) {
    if bar.is_hidden() {
        eprintln!("{}", line.as_ref());
    } else {
        bar.println(line);
    }
}

/// The model a project names in `training.model` (resolved against its folder), else tiny.
pub(crate) fn project_model(project: &Project) -> ModelChoice {
    match &project.training.model {
        Some(p) => ModelChoice::Path(project.resolve(p)),
        None => ModelChoice::Tiny,
    }
}

/// Runs `train`: exit 0 when the run finishes or is stopped, 1 when it fails.
pub fn run(args: TrainArgs) -> anyhow::Result<i32> {
    let spec = match (&args.resume, &args.project) {
        (Some(run), _) => {
            let mut spec = resume_spec(run)?;
            spec.max_steps = args.steps;
            spec.force_cpu |= args.cpu;
            spec
        }
        (None, Some(path)) => {
            let mut project = Project::load(path)?;
            args.apply_phases(&mut project)?;
            let model = match args.model.as_deref() {
                Some("tiny") => ModelChoice::Tiny,
                Some(p) => ModelChoice::Path(PathBuf::from(p)),
                None => project_model(&project),
            };
            let mut spec = RunSpec::new(project, model);
            if let Some(out) = &args.out {
                spec.runs_dir = out.clone();
            }
            spec.mode = args.mode;
            spec.max_steps = args.steps;
            spec.force_cpu = args.cpu;
            spec.lora = args.lora.then_some(true);
            spec
        }
        (None, None) => anyhow::bail!("give a project file or --resume RUN_DIR"),
    };
    let handle = spawn_run(spec, Arc::new(|| {}))?;
    // Ctrl-C asks the worker to stop after a checkpoint; a second one quits at once.
    let stop = handle.stop.clone();
    let _ = ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            eprintln!("interrupted again: quitting without waiting for the checkpoint");
            std::process::exit(130);
        }
        eprintln!("stopping after the current step (Ctrl-C again to quit at once)");
    });
    if !args.json {
        eprintln!("run folder: {}", handle.run_dir.display());
    }
    let bar = (!args.json).then(|| {
        let bar = indicatif::ProgressBar::with_draw_target(
            None,
            indicatif::ProgressDrawTarget::stderr_with_hz(5),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} steps {msg} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    // Without a terminal event the worker died unexpectedly: that is a failure.
    let mut code = 1;
    while let Ok(event) = handle.events.recv() {
        if args.json {
            println!("{}", serde_json::to_string(&event)?);
        }
        if let Some(bar) = &bar {
            match &event {
                TrainEvent::Started {
                    device,
                    device_reason,
                    parameters,
                    trainable,
                    total_steps,
                    kernels,
                } => {
                    bar.set_length(*total_steps);
                    bar.set_prefix(device.clone());
                    say(
                        bar,
                        format!(
                            "{parameters} parameters ({trainable} trained) on {device} \
                             ({device_reason}); {kernels}"
                        ),
                    );
                }
                TrainEvent::Step(m) => {
                    bar.set_position(m.step);
                    bar.set_message(format!(
                        "loss {:.4} lr {:.2e} {:.0} tok/s",
                        m.loss, m.lr, m.tokens_per_sec
                    ));
                }
                TrainEvent::Log { message } => say(bar, message),
                TrainEvent::Checkpoint { path, .. } => say(bar, format!("checkpoint {path}")),
                TrainEvent::Eval(e) => say(
                    bar,
                    format!(
                        "eval step {} {:<12} {:<7} prompt: loss {:.4} accuracy {:.3}{}",
                        e.step,
                        e.task,
                        e.prompt.label(),
                        e.loss,
                        e.accuracy,
                        e.exact_match
                            .map(|x| format!(" exact match {x:.3} of {}", e.generated))
                            .unwrap_or_default()
                            + &e.steps_done
                                .map(|x| format!(" every step {x:.3} of {}", e.steps_tried))
                                .unwrap_or_default()
                    ),
                ),
                TrainEvent::Generated { step, text, .. } => {
                    say(bar, format!("answer at step {step}: {text}"))
                }
                TrainEvent::Difficulty(d) => {
                    let cuts: Vec<String> = d
                        .cuts
                        .iter()
                        .map(|(task, c)| {
                            let c: Vec<String> = c.iter().map(|x| format!("{x:.3}")).collect();
                            format!("{task} {}", c.join(" | "))
                        })
                        .collect();
                    say(bar, format!("phase cut points: {}", cuts.join("; ")));
                }
                TrainEvent::PhaseStarted {
                    phase,
                    phases,
                    step,
                    records,
                    ..
                } => say(
                    bar,
                    format!("phase {phase} of {phases} starts at step {step} ({records} records)"),
                ),
                TrainEvent::PhaseEnded {
                    phase,
                    step,
                    tokens,
                } => say(
                    bar,
                    format!("phase {phase} ends at step {step} ({tokens} tokens)"),
                ),
                TrainEvent::Finished { step } => say(bar, format!("finished at step {step}")),
                TrainEvent::Stopped { step } => say(bar, format!("stopped at step {step}")),
                TrainEvent::Failed { error } => say(bar, format!("failed: {error}")),
            }
        }
        code = match event {
            TrainEvent::Failed { .. } => 1,
            TrainEvent::Finished { .. } | TrainEvent::Stopped { .. } => 0,
            _ => code,
        };
        if event.is_terminal() {
            break;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    handle.join();
    Ok(code)
}
