//! `moi-studio train PROJECT`: a run in the terminal, with a progress bar or JSON events.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Args;

use crate::core::events::TrainEvent;
use crate::core::packing::PackMode;
use crate::core::project::Project;
use crate::train::worker::{ModelChoice, RunSpec, spawn_run};

/// Arguments of `train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The project file.
    pub project: PathBuf,
    /// Packing mode (default: the project's).
    #[arg(long)]
    pub mode: Option<PackMode>,
    /// "tiny" for the built-in model, or a Hugging Face folder or .gguf file.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Optimizer steps (default: the project's epochs).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Folder for runs (default: runs/ beside the project).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Train on the CPU even when a GPU is there.
    #[arg(long)]
    pub cpu: bool,
    /// Print one JSON event per line (the events the studio gets).
    #[arg(long)]
    pub json: bool,
}

/// Runs `train`: exit 0 when the run finishes or is stopped, 1 when it fails.
pub fn run(args: TrainArgs) -> anyhow::Result<i32> {
    let project = Project::load(&args.project)?;
    let runs_dir = args
        .out
        .clone()
        .unwrap_or_else(|| project.base_dir.join("runs"));
    let model = if args.model == "tiny" {
        ModelChoice::Tiny
    } else {
        ModelChoice::Path(PathBuf::from(&args.model))
    };
    let handle = spawn_run(
        RunSpec {
            project,
            model,
            mode: args.mode,
            max_steps: args.steps,
            runs_dir,
            force_cpu: args.cpu,
        },
        Arc::new(|| {}),
    )?;
    // Ctrl-C asks the worker to stop after a checkpoint; a second one is left to the default.
    let stop = handle.stop.clone();
    let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
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
    let mut code = 0;
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
                    total_steps,
                    ..
                } => {
                    bar.set_length(*total_steps);
                    bar.set_prefix(device.clone());
                    bar.println(format!(
                        "{parameters} parameters on {device} ({device_reason})"
                    ));
                }
                TrainEvent::Step(m) => {
                    bar.set_position(m.step);
                    bar.set_message(format!(
                        "loss {:.4} lr {:.2e} {:.0} tok/s",
                        m.loss, m.lr, m.tokens_per_sec
                    ));
                }
                TrainEvent::Log { message } => bar.println(message),
                TrainEvent::Checkpoint { path, .. } => bar.println(format!("checkpoint {path}")),
                TrainEvent::Eval(e) => bar.println(format!(
                    "eval step {} {} ({:?} prompt): loss {:.4} accuracy {:.3}",
                    e.step, e.task, e.prompt, e.loss, e.accuracy
                )),
                TrainEvent::Finished { step } => bar.println(format!("finished at step {step}")),
                TrainEvent::Stopped { step } => bar.println(format!("stopped at step {step}")),
                TrainEvent::Failed { error } => bar.println(format!("failed: {error}")),
            }
        }
        if let TrainEvent::Failed { .. } = event {
            code = 1;
        }
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
