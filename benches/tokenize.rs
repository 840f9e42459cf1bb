//! Tokenizing speed on the shipped datasets: the demo project's records rendered with ChatML,
//! tokenized with labels by the built-in tokenizer, on all cores.
//!
//!   cargo bench --bench tokenize -- [REPEATS (default 20)]

use std::path::PathBuf;
use std::time::Instant;

use moi_studio::core::dataset::load_project;
use moi_studio::core::mixing::{Prepared, load_template, load_tokenizer};
use moi_studio::core::project::Project;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let repeats: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(20);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets/benchmarks.moi.toml");
    let project = Project::load(&path).expect("demo project");
    let data = load_project(&project, &mut |_| {});
    let t = Instant::now();
    let tokenizer = load_tokenizer(&project, &project.mixing, &data).expect("tokenizer");
    println!(
        "built-in tokenizer trained on {} records in {:.2} s ({} tokens in its vocabulary)",
        data.iter().map(|d| d.records.len()).sum::<usize>(),
        t.elapsed().as_secs_f64(),
        tokenizer.get_vocab_size(true)
    );
    let template = load_template(&project, &project.mixing).expect("template");
    let mut best = f64::INFINITY;
    let mut samples = 0;
    let mut tokens = 0;
    for _ in 0..repeats {
        let t = Instant::now();
        let prepared = Prepared::build(
            &project,
            &data,
            &tokenizer,
            &template,
            project.mixing.labels,
        )
        .expect("tokenize");
        best = best.min(t.elapsed().as_secs_f64());
        samples = prepared
            .tasks
            .iter()
            .map(|t| t.samples.len())
            .sum::<usize>();
        tokens = prepared.tasks.iter().map(|t| t.tokens()).sum::<u64>();
    }
    println!(
        "tokenized {samples} samples ({tokens} tokens) in {:.4} s (best of {repeats}): {:.0} samples/s, {:.0} tokens/s",
        best,
        samples as f64 / best,
        tokens as f64 / best
    );
}
