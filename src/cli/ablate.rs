//! `moi-studio ablate PROJECT --out DIR`: the paper's ablation on the project's own data, with
//! progress on the terminal, Ctrl-C to stop cleanly, and the same `--out` to resume.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Args;

use crate::core::ablation::{AblationPlan, Variant, parse_attention};
use crate::core::events::TrainEvent;
use crate::core::project::Project;
use crate::train::ablate::{AblationProgress, load_ablation, run_ablation};

/// Arguments of `ablate`.
#[derive(Debug, Args)]
pub struct AblateArgs {
    /// The project file.
    pub project: PathBuf,
    /// Folder for the runs and the reports; the same folder again resumes.
    #[arg(long)]
    pub out: PathBuf,
    /// Variants, comma-separated: seq, concat, balanced, moi, moi-first-default, and the
    /// neighbouring methods sit (chained instructions), phased and phased-random (Phased IFT
    /// and its control).
    #[arg(long, default_value = "seq,concat,balanced,moi", value_delimiter = ',')]
    pub variants: Vec<Variant>,
    /// Attention layouts, comma-separated: full, isolated, chunk (default: the project's).
    #[arg(long, value_delimiter = ',', value_parser = parse_attention)]
    pub attention: Vec<crate::core::settings::AttentionLayout>,
    /// Non-padding tokens each run trains on.
    #[arg(long, default_value_t = 400_000)]
    pub tokens: u64,
    /// Seeds, comma-separated.
    #[arg(long, default_value = "1,2,3", value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Evaluations per run, at the same token counts in every run.
    #[arg(long, default_value_t = 5)]
    pub evals: u32,
    /// "tiny" for the built-in model, or a Hugging Face folder or .gguf file (default: the
    /// project's `training.model`, else tiny).
    #[arg(long)]
    pub model: Option<String>,
    /// Print one JSON object per line (progress and the final table) instead of a bar.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ablate`: 0 when every run finished and the reports are written, 130 when stopped.
pub fn run(args: AblateArgs) -> anyhow::Result<i32> {
    let project = Project::load(&args.project)?;
    let attentions = if args.attention.is_empty() {
        vec![project.packing.attention]
    } else {
        args.attention.clone()
    };
    let model = match args.model.as_deref() {
        Some("tiny") => "tiny".to_string(),
        Some(p) => std::path::absolute(p)?.display().to_string(),
        None => match crate::cli::train::project_model(&project) {
            crate::train::worker::ModelChoice::Tiny => "tiny".to_string(),
            crate::train::worker::ModelChoice::Path(p) => p.display().to_string(),
        },
    };
    let plan = AblationPlan {
        variants: args.variants.clone(),
        attentions,
        tokens: args.tokens,
        seeds: args.seeds.clone(),
        evals: args.evals,
        model,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // A second Ctrl-C while the run saves its checkpoint is ignored: the save finishes.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(args.tokens),
        indicatif::ProgressDrawTarget::stderr_with_hz(4),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix:>28} [{bar:30}] {pos}/{len} tokens · {msg} · ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let json = args.json;
    let say = |line: String| {
        if json || bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let complete = run_ablation(&project, &plan, &args.out, &stop, &mut |p| match p {
        AblationProgress::RunStarted {
            index,
            total,
            key,
            resumed,
        } => {
            bar.set_prefix(format!("run {}/{} {}", index + 1, total, key.dir_name()));
            bar.set_position(0);
            bar.reset_eta();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "run_started", "index": index, "total": total,
                        "run": key.dir_name(), "resumed": resumed})
                );
            } else {
                say(format!(
                    "run {}/{}: {}{}",
                    index + 1,
                    total,
                    key.dir_name(),
                    if resumed { " (resumed)" } else { "" }
                ));
            }
        }
        AblationProgress::RunSkipped { index, total, key } => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "run_skipped", "index": index, "total": total,
                        "run": key.dir_name()})
                );
            } else {
                say(format!(
                    "run {}/{}: {} finished before, reused",
                    index + 1,
                    total,
                    key.dir_name()
                ));
            }
        }
        AblationProgress::Event { key, event, .. } => {
            if json {
                if let Ok(mut v) = serde_json::to_value(&event) {
                    v["run"] = serde_json::Value::from(key.dir_name());
                    println!("{v}");
                }
                return;
            }
            match &event {
                TrainEvent::Step(m) => {
                    bar.set_position(m.tokens_seen.min(args.tokens));
                    bar.set_message(format!("step {} loss {:.3}", m.step, m.loss));
                }
                TrainEvent::Eval(e) => {
                    if let Some(em) = e.exact_match {
                        say(format!(
                            "  {:>9} tokens  {:<10} {:<7} loss {:.3}  exact {:>5.1}%{}",
                            bar.position(),
                            e.task,
                            e.prompt.label(),
                            e.loss,
                            em * 100.0,
                            e.steps_done
                                .map(|s| format!("  every step {:>5.1}%", s * 100.0))
                                .unwrap_or_default()
                        ));
                    }
                }
                TrainEvent::Failed { error } => say(format!("  failed: {error}")),
                _ => {}
            }
        }
    })?;
    bar.finish_and_clear();
    if !complete {
        eprintln!(
            "stopped; run the same command again to resume ({})",
            args.out.display()
        );
        return Ok(130);
    }
    let (plan, results) = load_ablation(&args.out)?;
    let written = crate::core::figure::write_reports(&args.out, &plan, &results)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"event": "done", "reports": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()})
        );
    } else {
        println!("{}", results.markdown(&plan));
        for p in written {
            println!("wrote {}", p.display());
        }
    }
    Ok(0)
}
