//! `moi-studio export --run DIR --out DIR2`: a run's trained model as a Hugging Face folder
//! (config, safetensors, tokenizer with chat template) and, for LoRA runs, the PEFT adapter;
//! with `--gguf`, a llama.cpp GGUF file and an Ollama Modelfile instead.

use std::path::PathBuf;

use clap::Args;

use crate::train::export::{NoModel, export_run};
use crate::train::gguf_export::{Quant, export_run_gguf};

/// Arguments of `export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The run folder.
    #[arg(long)]
    pub run: PathBuf,
    /// Where the export goes (created; files in it are replaced). Needed for the Hugging Face
    /// folder; with --gguf it defaults to the run's `gguf/` folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write a llama.cpp GGUF file (the merged model, tokenizer and chat template in its
    /// metadata) and an Ollama Modelfile instead of a Hugging Face folder.
    #[arg(long)]
    pub gguf: bool,
    /// The GGUF's weight type.
    #[arg(long, value_enum, default_value_t = Quant::F16, requires = "gguf")]
    pub quant: Quant,
}

/// Runs `export`: exit 0 with the files written, 1 when the run has no model to export.
pub fn run(args: ExportArgs) -> anyhow::Result<i32> {
    let result = if args.gguf {
        let out = args.out.clone().unwrap_or_else(|| args.run.join("gguf"));
        export_run_gguf(&args.run, &out, args.quant).map(|e| {
            println!(
                "exported {} to {} ({}) and {}{}",
                args.run.join("model").display(),
                e.gguf.display(),
                args.quant.label(),
                e.modelfile.display(),
                if e.template_translated {
                    ""
                } else {
                    " (its chat template could not be translated for Ollama: see the Modelfile)"
                }
            );
            println!(
                "try it: ollama create NAME -f {}   or   llama-cli -m {}",
                e.modelfile.display(),
                e.gguf.display()
            );
        })
    } else {
        let Some(out) = &args.out else {
            eprintln!("error: --out DIR is needed for a Hugging Face export (or pass --gguf)");
            return Ok(2);
        };
        export_run(&args.run, out).map(|adapter| {
            println!(
                "exported {} to {}{}",
                args.run.join("model").display(),
                out.display(),
                if adapter {
                    " (with the PEFT adapter in adapter/)"
                } else {
                    ""
                }
            );
        })
    };
    match result {
        Ok(()) => Ok(0),
        Err(e) if e.downcast_ref::<NoModel>().is_some() => {
            eprintln!("error: {e}");
            Ok(1)
        }
        Err(e) => Err(e),
    }
}
