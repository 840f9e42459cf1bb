//! `moi-studio export --run DIR --out DIR2`: a run's trained model as a Hugging Face folder
//! (config, safetensors, tokenizer with chat template) and, for LoRA runs, the PEFT adapter.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use clap::Args;

use crate::core::fsutil::write_atomic;
use crate::train::load::load_hf_folder;

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

const MODEL_FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];
const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// Copies `files` from `from` to `to`, each through a temporary file and a rename.
fn copy_files(from: &Path, to: &Path, files: &[&str]) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for f in files {
        let src = from.join(f);
        let tmp = to.join(format!(".{f}.tmp"));
        std::fs::copy(&src, &tmp).with_context(|| format!("copying {}", src.display()))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, to.join(f))?;
    }
    Ok(())
}

/// The model card: what the folder holds and how to load it with Python.
fn readme(run: &Path, adapter: bool) -> String {
    let mut text = format!(
        "# Model exported by MoI Studio\n\nFrom run `{}`.\n\n```python\n\
         from transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
         tok = AutoTokenizer.from_pretrained(\"PATH\")\n\
         model = AutoModelForCausalLM.from_pretrained(\"PATH\")\n\
         messages = [{{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}},\n\
         \x20           {{\"role\": \"user\", \"content\": \"What is 2 + 3?\"}}]\n\
         ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")\n\
         out = model.generate(ids, max_new_tokens=64, do_sample=False)\n\
         print(tok.decode(out[0, ids.shape[-1]:], skip_special_tokens=True))\n```\n",
        run.display()
    );
    if adapter {
        text.push_str(
            "\n`adapter/` holds the LoRA adapter alone (the model above has it merged). Load it on \
             the base model with PEFT:\n\n```python\nfrom peft import PeftModel\n\
             model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"BASE\"), \
             \"PATH/adapter\")\n```\n",
        );
    }
    text
}

/// Runs `export`: exit 0 with the folder written, 1 when the run has no model to export.
pub fn run(args: ExportArgs) -> anyhow::Result<i32> {
    let model = args.run.join("model");
    if let Some(missing) = MODEL_FILES.iter().find(|f| !model.join(f).is_file()) {
        eprintln!(
            "error: {} has no finished model ({} is missing); a run writes model/ when it \
             finishes or is stopped",
            args.run.display(),
            model.join(missing).display()
        );
        return Ok(1);
    }
    // Refuse to copy something that does not load.
    load_hf_folder(&model, &Device::Cpu)
        .with_context(|| format!("checking {}", model.display()))?;
    copy_files(&model, &args.out, &MODEL_FILES)?;
    let adapter = args.run.join("adapter");
    let has_adapter = ADAPTER_FILES.iter().all(|f| adapter.join(f).is_file());
    if has_adapter {
        copy_files(&adapter, &args.out.join("adapter"), &ADAPTER_FILES)?;
    }
    write_atomic(
        &args.out.join("README.md"),
        readme(&args.run, has_adapter).as_bytes(),
    )?;
    println!(
        "exported {} to {}{}",
        model.display(),
        args.out.display(),
        if has_adapter {
            " (with the PEFT adapter in adapter/)"
        } else {
            ""
        }
    );
    Ok(0)
}
