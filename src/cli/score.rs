//! `moi-studio score --model PATH --text-file F`: a model's perplexity on a text.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::train::device::choose_device;
use crate::train::score::{load_bundle, logits_of, score_ids};

/// Arguments of `score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// A Hugging Face model folder or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The text to score.
    #[arg(long)]
    pub text_file: PathBuf,
    /// Print {"tokens","nll","ppl"} as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write the token ids and the logits at every position as JSON
    /// (`{"ids": [...], "logits": [[...], ...]}`), to compare with another implementation.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
}

/// Runs `score`.
pub fn run(args: ScoreArgs) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(&args.text_file)
        .with_context(|| format!("reading {}", args.text_file.display()))?;
    let device = choose_device(false);
    let bundle = load_bundle(&args.model, &device.device)?;
    let ids = bundle.encode(&text)?;
    let score = score_ids(&bundle, &ids)?;
    if let Some(path) = &args.logits_out {
        let logits = logits_of(&bundle, &ids)?;
        let json = serde_json::json!({ "ids": ids, "logits": logits });
        crate::core::fsutil::write_atomic(path, serde_json::to_string(&json)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&score)?);
    } else {
        println!(
            "{} tokens, mean NLL {:.4} nats, perplexity {:.3} ({} on {})",
            score.tokens,
            score.nll,
            score.ppl,
            args.model.display(),
            device.name
        );
    }
    Ok(0)
}
