//! The command line: the same core functions the studio calls, for scripts and terminals.

mod ablate;
mod eval;
mod export;
mod import;
mod mix;
mod recipe;
mod score;
mod synth;
mod tasks;
mod train;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// MoI Studio: curate multi-task instruction data and fine-tune a model with
/// Mixture-of-Instructions. Run without a command to open the studio.
#[derive(Debug, Parser)]
#[command(name = "moi-studio", version, about, long_about = None)]
pub struct Cli {
    /// Project file to open in the studio (default: the built-in demo project).
    pub project: Option<PathBuf>,
    /// What to do; without one the studio opens.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The CLI commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Import a dataset file and print what was read and what was rejected.
    Import(import::ImportArgs),
    /// List a project's tasks with their record and rejection counts.
    Tasks(tasks::TasksArgs),
    /// Show the task mixture and the packed rows a project makes.
    Preview(mix::PreviewArgs),
    /// Write a project's packed training rows (parquet or JSONL) and mixed conversations.
    Pack(mix::PackArgs),
    /// Print a model's token count, mean negative log-likelihood and perplexity on a text.
    Score(score::ScoreArgs),
    /// Fine-tune a model on the project's mixture (a progress bar, or JSON events).
    Train(train::TrainArgs),
    /// Score a trained run on every task's held-out records, under its own and the default prompt.
    Eval(eval::EvalArgs),
    /// Write a run's model as a Hugging Face folder (and a PEFT adapter for LoRA runs).
    Export(export::ExportArgs),
    /// Write the project's packed MoI data and settings with a transformers/accelerate train.py
    /// (DDP, FSDP and DeepSpeed launch configs) for a bigger machine.
    ExportRecipe(recipe::RecipeArgs),
    /// Run the paper's ablation (seq, concat, balanced, moi) on the project's data and report it.
    Ablate(ablate::AblateArgs),
    /// Write the seeded synthetic MoI suite (general, math, code, tool use) and its project.
    Synth(synth::SynthArgs),
    /// The studio's trainer process: a run spec and commands as JSON lines on stdin, events as
    /// JSON lines on stdout (not for people; the studio starts it).
    #[command(hide = true)]
    Worker,
}

/// One line per command, for messages that tell a user what else they can do.
pub fn command_summary() -> String {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let mut out = String::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        out.push_str(&format!("  moi-studio {:<8} {about}\n", sub.get_name()));
    }
    out
}

/// Runs a CLI command and returns the process exit code.
pub fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Import(args) => import::run(args),
        Command::Tasks(args) => tasks::run(args),
        Command::Preview(args) => mix::run_preview(args),
        Command::Pack(args) => mix::run_pack(args),
        Command::Score(args) => score::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Export(args) => export::run(args),
        Command::ExportRecipe(args) => recipe::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Ablate(args) => ablate::run(args),
        Command::Worker => {
            crate::train::process::serve(
                std::io::BufReader::new(std::io::stdin()),
                std::io::stdout().lock(),
            )?;
            Ok(0)
        }
    }
}

/// A progress bar on stderr for a byte count, hidden when stderr is not a terminal.
pub(crate) fn byte_bar(total: u64, message: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr_with_hz(10),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message);
    bar
}
