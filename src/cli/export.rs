//! `moi-studio export --run DIR --out DIR2`: a run's trained model as a Hugging Face folder
//! (config, safetensors, tokenizer with chat template) and, for LoRA runs, the PEFT adapter.

use std::path::PathBuf;

use clap::Args;

use crate::train::export::{NoModel, export_run};

/// Arguments of `export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The run folder.
    #[arg(long)]
    pub run: PathBuf,
    /// Where the Hugging Face folder goes (created; files in it are replaced).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `export`: exit 0 with the folder written, 1 when the run has no model to export.
pub fn run(args: ExportArgs) -> anyhow::Result<i32> {
    match export_run(&args.run, &args.out) {
        Ok(adapter) => {
            println!(
                "exported {} to {}{}",
                args.run.join("model").display(),
                args.out.display(),
                if adapter {
                    " (with the PEFT adapter in adapter/)"
                } else {
                    ""
                }
            );
            Ok(0)
        }
        Err(e) if e.downcast_ref::<NoModel>().is_some() => {
            eprintln!("error: {e}");
            Ok(1)
        }
        Err(e) => Err(e),
    }
}
