//! `moi-studio export-recipe PROJECT --out DIR [--model HF_ID_OR_PATH]`: the project's packed
//! MoI data, held-out items and settings with a transformers + accelerate `train.py`.

use std::path::PathBuf;

use clap::Args;

use crate::cli::train::project_model;
use crate::core::project::Project;
use crate::train::recipe::{RecipeSpec, export_recipe};
use crate::train::worker::ModelChoice;

/// Arguments of `export-recipe`.
#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// The project file.
    pub project: PathBuf,
    /// The recipe folder (created; files in it are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// The model to train: a local Hugging Face folder or .gguf file (the rows are tokenized
    /// with its tokenizer), or a Hugging Face hub id with the same tokenizer as the project's
    /// model (default: the project's model).
    #[arg(long)]
    pub model: Option<String>,
}

/// Runs `export-recipe`.
pub fn run(args: RecipeArgs) -> anyhow::Result<i32> {
    let project = Project::load(&args.project)?;
    let (model, hub_model) = match &args.model {
        Some(m) if std::path::Path::new(m).exists() => (ModelChoice::Path(PathBuf::from(m)), None),
        Some(id) => (project_model(&project), Some(id.clone())),
        None => (project_model(&project), None),
    };
    let spec = RecipeSpec {
        project,
        model,
        hub_model,
        out: args.out.clone(),
    };
    let summary = export_recipe(&spec, &mut |m| eprintln!("{m}"))?;
    for note in &summary.notes {
        eprintln!("note: {note}");
    }
    println!(
        "recipe written to {}: {} rows ({} tokens, {} steps), {} held-out items, model {}\n\
         run it with: python {}/train.py --output out   (README.md there has the multi-GPU commands)",
        args.out.display(),
        summary.rows,
        summary.tokens,
        summary.steps,
        summary.eval_items,
        summary.model,
        args.out.display()
    );
    Ok(0)
}
