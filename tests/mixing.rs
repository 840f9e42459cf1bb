//! The mixing engine on the demo project: previews, invariants of packed rows, and the packed
//! dataset written by `moi-studio pack` read back from parquet.

use std::path::PathBuf;
use std::sync::OnceLock;

use assert_cmd::Command;
use moi_studio::core::dataset::{TaskData, load_project};
use moi_studio::core::mixing::{PackingPreview, Prepared};
use moi_studio::core::packing::{IGNORE_INDEX, PackMode, PackSettings, SegmentKind};
use moi_studio::core::project::Project;

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets/benchmarks.moi.toml")
}

struct Fixture {
    project: Project,
    prepared: Prepared,
    tokenizer: tokenizers::Tokenizer,
    #[allow(dead_code)]
    data: Vec<TaskData>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let project = Project::load(&demo()).unwrap();
        let data = load_project(&project, &mut |_| {});
        let (tokenizer, prepared) = Prepared::for_project(&project, &data).unwrap();
        Fixture {
            project,
            prepared,
            tokenizer,
            data,
        }
    })
}

/// The demo's packing settings with 2048-token rows (the demo itself uses 512 for the tiny model).
fn settings(mode: PackMode) -> PackSettings {
    PackSettings {
        mode,
        max_seq_len: 2048,
        ..fixture().project.packing.clone()
    }
}

#[test]
fn every_task_is_tokenized_without_failures() {
    let f = fixture();
    let sizes: Vec<usize> = f.prepared.tasks.iter().map(|t| t.samples.len()).collect();
    assert_eq!(
        sizes,
        [90, 148, 360],
        "train records after the 10% eval split"
    );
    assert!(f.prepared.tasks.iter().all(|t| t.failed.is_empty()));
    let prefix = f
        .tokenizer
        .decode(&f.prepared.prefix.input_ids, false)
        .unwrap();
    assert_eq!(
        prefix,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    );
}

#[test]
fn moi_rows_start_with_the_default_prompt_and_respect_the_limit() {
    let f = fixture();
    let s = settings(PackMode::Moi);
    let plan = f
        .prepared
        .pack_epoch(&f.project.mixing, &s, f.project.seed, 0);
    let prefix = &f.prepared.prefix.input_ids;
    for i in 0..plan.rows.len() {
        let row = f.prepared.row(&plan, i, &s);
        assert!(row.input_ids.len() <= s.max_seq_len);
        assert_eq!(&row.input_ids[..prefix.len()], prefix.as_slice(), "row {i}");
        assert_eq!(row.segments[0].kind, SegmentKind::DefaultPrompt);
        // Labels are ids or ignored, and the prefix and system prompts are never trained.
        for (k, (&id, &label)) in row.input_ids.iter().zip(&row.labels).enumerate() {
            assert!(label == IGNORE_INDEX || label == id as i32);
            if k < prefix.len() {
                assert_eq!(label, IGNORE_INDEX);
            }
        }
        for seg in &row.segments {
            for t in seg.system.clone() {
                assert_eq!(row.labels[t as usize], IGNORE_INDEX);
            }
        }
    }
    // Balanced sampling passes over a task's samples before it repeats any: in an epoch every
    // sample of a task appears ⌊c/n⌋ or ⌈c/n⌉ times (c drawn of n), so the biggest task's
    // samples appear at most once and the smallest task's all appear.
    let mut seen: std::collections::HashMap<(u32, u32), usize> = Default::default();
    for p in plan.pieces.iter().filter(|p| p.offset == 0) {
        *seen.entry((p.sample.task, p.sample.record)).or_default() += 1;
    }
    for (t, task) in f.prepared.tasks.iter().enumerate() {
        let n = task.samples.len();
        let counts: Vec<usize> = (0..n as u32)
            .map(|r| seen.get(&(t as u32, r)).copied().unwrap_or(0))
            .collect();
        let drawn: usize = counts.iter().sum();
        let (lo, hi) = (drawn / n, drawn.div_ceil(n));
        assert!(
            counts.iter().all(|&c| c == lo || c == hi),
            "{}: {drawn} drawn of {n}, counts outside {lo}..={hi}",
            task.name
        );
        if n == 360 {
            assert!(
                counts.iter().all(|&c| c <= 1),
                "the biggest task repeats a sample"
            );
        }
        if n == 90 {
            assert!(
                counts.iter().all(|&c| c >= 1),
                "the smallest task misses a sample"
            );
        }
    }
    let same = f
        .prepared
        .pack_epoch(&f.project.mixing, &s, f.project.seed, 0);
    assert_eq!(plan, same, "same seed, same rows");
}

#[test]
fn previews_show_balance_and_fill() {
    let f = fixture();
    let mix = f.prepared.mixture(PackMode::Moi, &f.project.mixing);
    let shares: Vec<f64> = mix.rows.iter().map(|r| r.sample_share).collect();
    assert!(
        shares.iter().all(|s| (s - 1.0 / 3.0).abs() < 0.01),
        "{shares:?}"
    );
    assert!(
        mix.rows[2].natural_sample_share > 0.55,
        "tool use dominates naturally"
    );
    let natural = f.prepared.mixture(PackMode::Concat, &f.project.mixing);
    assert!((natural.rows[2].sample_share - 360.0 / 598.0).abs() < 1e-9);

    let moi = PackingPreview::build(
        &f.prepared,
        &f.project.mixing,
        &settings(PackMode::Moi),
        1,
        2,
    );
    let seq = PackingPreview::build(
        &f.prepared,
        &f.project.mixing,
        &settings(PackMode::Seq),
        1,
        0,
    );
    assert!(moi.fill > 0.95, "moi fill {}", moi.fill);
    assert!(
        seq.fill < 0.3,
        "one short conversation per 2048-token row wastes most of it"
    );
    assert_eq!(seq.rows, 598);
    assert!((moi.fill + moi.padding - 1.0).abs() < 1e-9);
    assert_eq!(moi.histogram.iter().sum::<usize>(), moi.rows);
    assert_eq!(moi.sample_rows.len(), 2);
    assert!(moi.trained_tokens > 0.1 && moi.trained_tokens < 0.9);
}

#[test]
fn preview_json_and_pack_parquet_read_back() {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::cargo_bin("moi-studio")
        .unwrap()
        .current_dir(&root)
        .args([
            "preview",
            "presets/benchmarks.moi.toml",
            "--json",
            "--rows",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mixture"].as_array().unwrap().len(), 3);
    let rows = v["packing"]["rows"].as_u64().unwrap();
    // The demo packs into 512-token rows for the tiny model; its long samples leave some room.
    assert!(v["packing"]["fill"].as_f64().unwrap() > 0.8);
    // The reference fill and how chunks mix are part of the report.
    let fill = v["packing"]["fill"].as_f64().unwrap();
    let reference = v["packing"]["best_fit_fill"].as_f64().unwrap();
    assert!(fill >= reference - 0.01, "{fill} vs {reference}");
    let chunks = &v["packing"]["chunks"];
    assert!(chunks["mixed"].as_u64().unwrap() > 0);
    assert!(chunks["chunks"].as_u64().unwrap() >= chunks["mixed"].as_u64().unwrap());
    assert!(chunks["unmixable"].as_u64().is_some());
    let text = v["sample_rows"][0]["text"].as_str().unwrap();
    assert!(
        text.starts_with("⟦default prompt⟧<|im_start|>system\nYou are a helpful assistant."),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = Command::cargo_bin("moi-studio")
        .unwrap()
        .current_dir(&root)
        .args(["pack", "presets/benchmarks.moi.toml", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = std::fs::File::open(dir.path().join("packed.parquet")).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut n = 0;
    for batch in reader {
        let batch = batch.unwrap();
        let names: Vec<String> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(
            names,
            ["input_ids", "labels", "position_ids", "segment_ids"]
        );
        let ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow_array::ListArray>()
            .unwrap();
        let labels = batch
            .column(1)
            .as_any()
            .downcast_ref::<arrow_array::ListArray>()
            .unwrap();
        for r in 0..batch.num_rows() {
            let a = ids.value(r);
            let b = labels.value(r);
            assert_eq!(a.len(), b.len());
            assert!(a.len() <= 512);
        }
        n += batch.num_rows();
    }
    assert_eq!(n as u64, rows, "the parquet holds the previewed rows");
    let mixed = std::fs::read_to_string(dir.path().join("mixed.jsonl")).unwrap();
    assert_eq!(mixed.lines().count() as u64, rows);
    let first: serde_json::Value = serde_json::from_str(mixed.lines().next().unwrap()).unwrap();
    assert_eq!(
        first["messages"][0]["content"],
        "You are a helpful assistant."
    );
    assert!(dir.path().join("tokenizer.json").is_file());
}

/// The demo at its own 512-token rows (the tiny model's): rows fill within a point of a sorted
/// best-fit-decreasing packer on the same pieces, and nearly every chunk mixes tasks.
#[test]
fn demo_rows_fill_like_best_fit_and_chunks_mix_tasks() {
    let f = fixture();
    let pack = f.project.packing.clone();
    assert_eq!(pack.max_seq_len, 512);
    let preview = PackingPreview::build(&f.prepared, &f.project.mixing, &pack, f.project.seed, 0);
    println!(
        "demo at 512: fill {:.2}%, best-fit decreasing {:.2}%, chunks {:?}",
        preview.fill * 100.0,
        preview.best_fit_fill * 100.0,
        preview.chunks
    );
    assert!(
        preview.fill >= preview.best_fit_fill - 0.01,
        "fill {} vs best-fit decreasing {}",
        preview.fill,
        preview.best_fit_fill
    );
    // Some code answers are too long to share a 512-token row with anything of another task;
    // of the chunks the sizes allow to mix, nearly all do.
    assert!(
        preview.chunks.share_of_mixable() >= 0.9,
        "{:?}",
        preview.chunks
    );
}

/// With a tokenizer file and no chained instructions, `pack` spills tokenized samples to
/// temporary files instead of holding them: the rows, conversations and manifest it writes are
/// byte for byte the in-memory engine's (eval split and two reshuffled epochs included), and no
/// temporary file is left beside them.
#[test]
fn spilled_pack_writes_what_the_in_memory_engine_writes() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    fixture().tokenizer.save(&tokenizer, false).unwrap();
    let mut project = Project::load(&demo()).unwrap();
    project.mixing.tokenizer = Some(tokenizer);
    project.mixing.epochs = 2;
    for task in &mut project.tasks {
        task.sit.steps.clear();
    }
    let path = dir.path().join("spill.moi.toml");
    project.save(&path).unwrap();
    let pack = |out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let run = Command::cargo_bin("moi-studio")
            .unwrap()
            .arg("pack")
            .arg(&path)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr).to_string();
        assert_eq!(run.status.code(), Some(0), "{stderr}");
        (out, stderr)
    };
    let (spilled, said) = pack("spilled", &[]);
    assert!(said.contains("reading and tokenizing"), "{said}");
    let (memory, said) = pack("memory", &["--in-memory"]);
    assert!(!said.contains("reading and tokenizing"), "{said}");
    for file in [
        "packed.parquet",
        "mixed.jsonl",
        "manifest.json",
        "tokenizer.json",
    ] {
        let a = std::fs::read(spilled.join(file)).unwrap();
        let b = std::fs::read(memory.join(file)).unwrap();
        assert!(
            a == b,
            "{file} differs between the spilled and in-memory paths"
        );
    }
    let mut left: Vec<String> = std::fs::read_dir(&spilled)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "manifest.json",
            "mixed.jsonl",
            "packed.parquet",
            "tokenizer.json"
        ]
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(spilled.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["epochs"], 2);
    let mixed = std::fs::read_to_string(spilled.join("mixed.jsonl")).unwrap();
    assert_eq!(
        mixed.lines().count() as u64,
        manifest["rows"].as_u64().unwrap()
    );
    for line in mixed.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let messages = row["messages"].as_array().unwrap();
        assert_eq!(messages[0]["content"], "You are a helpful assistant.");
        assert!(
            messages.len() >= 2 || row["partial"].as_u64().unwrap() > 0,
            "{line}"
        );
        assert!(row["tasks"].as_array().is_some());
    }
}
