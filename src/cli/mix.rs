//! `moi-studio preview` and `moi-studio pack`: the mixing engine from the command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::core::dataset::{TaskData, load_task};
use crate::core::fsutil::write_atomic;
use crate::core::mixing::{PackingPreview, Prepared, load_template, load_tokenizer, row_text};
use crate::core::packing::{PackMode, PackPlan, PackSettings, PackedRow, SegmentKind};
use crate::core::project::Project;
use crate::core::tokenize::conversation;

/// Everything the mixing commands need, loaded once.
struct Loaded {
    project: Project,
    data: Vec<TaskData>,
    tokenizer: Tokenizer,
    prepared: Prepared,
}

/// Reads the project's data, loads or trains the tokenizer and tokenizes every task.
fn load(path: &Path, quiet: bool) -> anyhow::Result<Loaded> {
    let project = Project::load(path)?;
    let say = |m: &str| {
        if !quiet {
            eprintln!("{m}");
        }
    };
    let mut data = Vec::with_capacity(project.tasks.len());
    for (i, task) in project.tasks.iter().enumerate() {
        let d = load_task(&project, i, task, &mut |_| {});
        for s in &d.sources {
            if let Some(e) = &s.error {
                say(&format!("warning: {e}"));
            }
        }
        data.push(d);
    }
    if data.iter().all(|d| d.records.is_empty()) {
        bail!("no task of {} has any record to mix", path.display());
    }
    if project.mixing.tokenizer.is_none() {
        say("training the built-in tokenizer on the project's text…");
    }
    let tokenizer = load_tokenizer(&project, &project.mixing, &data)?;
    let template = load_template(&project, &project.mixing)?;
    say("tokenizing…");
    let prepared = Prepared::build(
        &project,
        &data,
        &tokenizer,
        &template,
        project.mixing.labels,
    )?;
    for t in &prepared.tasks {
        for (origin, why) in t.failed.iter().take(5) {
            say(&format!(
                "warning: task {} line {}: {why}",
                t.name, origin.line
            ));
        }
    }
    Ok(Loaded {
        project,
        data,
        tokenizer,
        prepared,
    })
}

fn pack_settings(project: &Project, mode: Option<PackMode>) -> PackSettings {
    let mut s = project.packing.clone();
    if let Some(m) = mode {
        s.mode = m;
    }
    s
}

/// Arguments of `preview`.
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// The project file.
    pub project: PathBuf,
    /// Packing mode (default: the project's).
    #[arg(long)]
    pub mode: Option<PackMode>,
    /// How many packed rows to show.
    #[arg(long, default_value_t = 2)]
    pub rows: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn segments_json(row: &PackedRow, prepared: &Prepared) -> Vec<Value> {
    row.segments
        .iter()
        .map(|s| {
            json!({
                "kind": s.kind,
                "task": s.task.map(|t| prepared.tasks[t as usize].name.clone()),
                "line": s.task.zip(s.record).map(|(t, r)| prepared.tasks[t as usize].origins[r as usize].line),
                "chunk": s.chunk,
                "tokens": [s.tokens.start, s.tokens.end],
                "system": [s.system.start, s.system.end],
                "trained": row.labels[s.tokens.start as usize..s.tokens.end as usize].iter().filter(|&&l| l >= 0).count(),
            })
        })
        .collect()
}

/// Runs `preview`.
pub fn run_preview(args: PreviewArgs) -> anyhow::Result<i32> {
    let loaded = load(&args.project, args.json)?;
    let pack = pack_settings(&loaded.project, args.mode);
    let mix = &loaded.project.mixing;
    let mixture = loaded.prepared.mixture(pack.mode, mix);
    let packing =
        PackingPreview::build(&loaded.prepared, mix, &pack, loaded.project.seed, args.rows);
    if args.json {
        let rows: Vec<Value> = packing
            .sample_rows
            .iter()
            .map(|r| {
                json!({
                    "length": r.input_ids.len(),
                    "text": row_text(r, &loaded.tokenizer, &loaded.prepared),
                    "segments": segments_json(r, &loaded.prepared),
                })
            })
            .collect();
        let out = json!({
            "mixture": mixture.rows,
            "strategy": mixture.strategy.name(),
            "packing": packing,
            "sample_rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    println!(
        "mixture ({} sampling, {} epoch{}):",
        mixture.strategy.name(),
        mixture.epochs,
        if mixture.epochs == 1 { "" } else { "s" }
    );
    println!(
        "  {:<14} {:>8} {:>9} {:>9} {:>17} {:>17}",
        "task", "records", "tokens", "samples", "sample share", "token share"
    );
    for r in &mixture.rows {
        println!(
            "  {:<14} {:>8} {:>9} {:>9} {:>7.1}% → {:>5.1}% {:>7.1}% → {:>5.1}%",
            r.task,
            r.records,
            r.tokens,
            r.samples,
            r.natural_sample_share * 100.0,
            r.sample_share * 100.0,
            r.natural_token_share * 100.0,
            r.token_share * 100.0
        );
    }
    println!(
        "packing ({}, rows of {} tokens): {} rows, fill {:.2}%, padding {:.2}%, trained tokens {:.1}%, \
         truncated {}, split {}, dropped {}",
        pack.mode.as_str(),
        packing.max_seq_len,
        packing.rows,
        packing.fill * 100.0,
        packing.padding * 100.0,
        packing.trained_tokens * 100.0,
        packing.overlong.truncated,
        packing.overlong.split,
        packing.overlong.dropped
    );
    let peak = packing.histogram.iter().copied().max().unwrap_or(1).max(1);
    let bars: String = packing
        .histogram
        .iter()
        .map(|&n| [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'][n * 8 / peak])
        .collect();
    println!("  row lengths 0…{}: [{bars}]", packing.max_seq_len);
    for t in &packing.tasks {
        println!(
            "  {:<14} {:>6} instructions ({:.1}%), {:>8} tokens ({:.1}%)",
            t.task,
            t.samples,
            t.sample_share * 100.0,
            t.tokens,
            t.token_share * 100.0
        );
    }
    for (i, row) in packing.sample_rows.iter().enumerate() {
        println!("\n── row {} ({} tokens) ──", i + 1, row.input_ids.len());
        println!("{}", row_text(row, &loaded.tokenizer, &loaded.prepared));
    }
    Ok(0)
}

/// File format of the packed rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PackFormat {
    /// Apache Parquet with list<int32> columns.
    Parquet,
    /// One JSON object per row.
    Jsonl,
}

/// Arguments of `pack`.
#[derive(Debug, Args)]
pub struct PackArgs {
    /// The project file.
    pub project: PathBuf,
    /// Folder to write into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// File format of the packed rows.
    #[arg(long, value_enum, default_value_t = PackFormat::Parquet)]
    pub format: PackFormat,
    /// Packing mode (default: the project's).
    #[arg(long)]
    pub mode: Option<PackMode>,
}

/// Rows per parquet row group.
const ROW_GROUP: usize = 1024;

fn write_parquet(path: &Path, rows: &[PackedRow]) -> anyhow::Result<()> {
    let tmp = path.with_extension("parquet.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(ROW_GROUP))
        .build();
    let mut writer: Option<parquet::arrow::ArrowWriter<std::fs::File>> = None;
    let mut file = Some(file);
    for group in rows.chunks(ROW_GROUP) {
        let column = |get: &dyn Fn(&PackedRow) -> Vec<i32>| -> ArrayRef {
            let mut b = ListBuilder::new(Int32Builder::new());
            for r in group {
                b.values().append_slice(&get(r));
                b.append(true);
            }
            Arc::new(b.finish())
        };
        let batch = RecordBatch::try_from_iter([
            (
                "input_ids",
                column(&|r| r.input_ids.iter().map(|&x| x as i32).collect()),
            ),
            ("labels", column(&|r| r.labels.clone())),
            (
                "position_ids",
                column(&|r| r.position_ids.iter().map(|&x| x as i32).collect()),
            ),
            (
                "segment_ids",
                column(&|r| r.segment_ids.iter().map(|&x| x as i32).collect()),
            ),
        ])?;
        if writer.is_none() {
            let f = file.take().context("parquet writer already started")?;
            writer = Some(parquet::arrow::ArrowWriter::try_new(
                f,
                batch.schema(),
                Some(props.clone()),
            )?);
        }
        if let Some(w) = writer.as_mut() {
            w.write(&batch)?;
        }
    }
    let Some(writer) = writer else {
        bail!("nothing to write: the plan has no rows");
    };
    let file = writer.into_inner()?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The row as one openai-messages conversation: the default prompt (in `moi` rows), then each
/// instruction's own system prompt, question and answer.
fn row_conversation(loaded: &Loaded, row: &PackedRow) -> Value {
    let mut messages = Vec::new();
    let mut tasks = Vec::new();
    for seg in &row.segments {
        match (seg.kind, seg.task, seg.record) {
            (SegmentKind::DefaultPrompt, _, _) => messages.push(json!({
                "role": "system",
                "content": loaded.project.default_system_prompt,
            })),
            (SegmentKind::Instruction, Some(t), Some(r)) => {
                let task = &loaded.project.tasks[t as usize];
                let prepared = &loaded.prepared.tasks[t as usize];
                let record = &loaded.data[t as usize].records[prepared.record_index[r as usize]];
                let mut conv = conversation(record, &task.system_prompt, task.system_rule);
                if seg.system.is_empty() && conv.first().is_some_and(|m| m.role == "system") {
                    conv.remove(0);
                }
                messages.extend(
                    conv.into_iter()
                        .map(|m| json!({"role": m.role, "content": m.content})),
                );
                tasks.push(task.name.clone());
            }
            _ => {}
        }
    }
    json!({ "messages": messages, "tasks": tasks })
}

fn jsonl<T: serde::Serialize>(items: impl Iterator<Item = T>) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for item in items {
        serde_json::to_writer(&mut out, &item)?;
        out.push(b'\n');
    }
    Ok(out)
}

/// Runs `pack`.
pub fn run_pack(args: PackArgs) -> anyhow::Result<i32> {
    let loaded = load(&args.project, false)?;
    let pack = pack_settings(&loaded.project, args.mode);
    // Every epoch is sampled and packed afresh (balanced sampling reshuffles per epoch).
    let epochs = loaded.project.mixing.epochs.max(1);
    let mut rows: Vec<PackedRow> = Vec::new();
    let mut tokens = 0u64;
    for epoch in 0..epochs {
        let plan: PackPlan =
            loaded
                .prepared
                .pack_epoch(&loaded.project.mixing, &pack, loaded.project.seed, epoch);
        tokens += plan.tokens();
        rows.extend((0..plan.rows.len()).map(|i| loaded.prepared.row(&plan, i, &pack)));
    }
    let fill = tokens as f64 / (rows.len().max(1) as f64 * pack.max_seq_len as f64);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let packed_path = match args.format {
        PackFormat::Parquet => {
            let p = args.out.join("packed.parquet");
            write_parquet(&p, &rows)?;
            p
        }
        PackFormat::Jsonl => {
            let p = args.out.join("packed.jsonl");
            let bytes = jsonl(rows.iter().map(|r| {
                json!({
                    "input_ids": r.input_ids,
                    "labels": r.labels,
                    "position_ids": r.position_ids,
                    "segment_ids": r.segment_ids,
                })
            }))?;
            write_atomic(&p, &bytes)?;
            p
        }
    };
    let mixed_path = args.out.join("mixed.jsonl");
    write_atomic(
        &mixed_path,
        &jsonl(rows.iter().map(|r| row_conversation(&loaded, r)))?,
    )?;
    let tokenizer_path = args.out.join("tokenizer.json");
    loaded
        .tokenizer
        .save(&tokenizer_path, false)
        .map_err(|e| anyhow::anyhow!("saving {}: {e}", tokenizer_path.display()))?;
    println!(
        "{} rows ({} epoch{}, {} mode, fill {:.2}%) written to {} and {}; tokenizer in {}",
        rows.len(),
        epochs,
        if epochs == 1 { "" } else { "s" },
        pack.mode.as_str(),
        fill * 100.0,
        packed_path.display(),
        mixed_path.display(),
        tokenizer_path.display()
    );
    Ok(0)
}
