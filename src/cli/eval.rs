//! `moi-studio eval PROJECT --run DIR`: the per-task table of a trained run — each task's
//! held-out records under its own system prompt and under the default one.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::core::dataset::load_project;
use crate::core::project::Project;
use crate::train::device::choose_device;
use crate::train::eval::{EvalSet, evaluate};
use crate::train::score::load_bundle;

/// Arguments of `eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The project whose held-out records are scored.
    pub project: PathBuf,
    /// The run folder (its `model/`), or any Hugging Face model folder or .gguf file.
    #[arg(long)]
    pub run: PathBuf,
    /// Held-out records per task (default: the project's training.eval_items).
    #[arg(long)]
    pub items: Option<usize>,
    /// Records per task answered by generation for exact match (default: training.eval_generate).
    #[arg(long)]
    pub generate: Option<usize>,
    /// Run on the CPU even when a GPU is there.
    #[arg(long)]
    pub cpu: bool,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `eval`: exit 0 with the table, 1 when nothing could be evaluated.
pub fn run(args: EvalArgs) -> anyhow::Result<i32> {
    let project = Project::load(&args.project)?;
    let model_path = if args.run.join("model").join("config.json").is_file() {
        args.run.join("model")
    } else {
        args.run.clone()
    };
    let device = choose_device(args.cpu);
    let bundle = load_bundle(&model_path, &device.device)?;
    let template = bundle.template()?;
    let data = load_project(&project, &mut |_| {});
    let set = EvalSet::build(
        &project,
        &data,
        &bundle.tokenizer,
        &template,
        args.items.unwrap_or(project.training.eval_items),
        args.generate.unwrap_or(project.training.eval_generate),
        bundle.loaded.config.max_position_embeddings,
    );
    if set.is_empty() {
        eprintln!(
            "error: no held-out records to evaluate in {} (set eval_fraction on its tasks)",
            args.project.display()
        );
        return Ok(1);
    }
    let step = std::fs::read_to_string(args.run.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["steps"].as_u64())
        .unwrap_or(0);
    let results = evaluate(&bundle.loaded.model, &set, step, &mut || true)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": model_path.display().to_string(),
                "device": device.name,
                "results": results,
            }))?
        );
        return Ok(0);
    }
    println!("model: {} ({})", model_path.display(), device.name);
    println!(
        "{:<16} {:<8} {:>6} {:>9} {:>10} {:>9} {:>12}",
        "task", "prompt", "items", "loss", "perplexity", "accuracy", "exact match"
    );
    for m in &results {
        let em = m
            .exact_match
            .map(|x| format!("{:.1}% of {}", x * 100.0, m.generated))
            .unwrap_or_else(|| "-".to_string());
        println!(
            "{:<16} {:<8} {:>6} {:>9.4} {:>10.2} {:>8.1}% {:>12}",
            m.task,
            m.prompt.label(),
            m.items,
            m.loss,
            m.perplexity,
            m.accuracy * 100.0,
            em
        );
    }
    Ok(0)
}
