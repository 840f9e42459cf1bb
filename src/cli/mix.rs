//! `moi-studio preview` and `moi-studio pack`: the mixing engine from the command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::core::chains::composes_training;
use crate::core::dataset::{TaskData, load_task};
use crate::core::fsutil::{set_readable, write_atomic};
use crate::core::mixing::{
    MixError, PackingPreview, Prepared, load_template, load_tokenizer, row_text,
};
use crate::core::packing::{PackMode, PackPlan, PackSettings, PackedRow, SegmentKind};
use crate::core::project::Project;
use crate::core::sampling::SampleRef;
use crate::core::spill::{Spilled, append_messages, messages_json};
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
    load_data(Project::load(path)?, path, quiet)
}

/// [`load`] for a project already read.
fn load_data(project: Project, path: &Path, quiet: bool) -> anyhow::Result<Loaded> {
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
    say(if project.mixing.tokenizer.is_none() {
        "training the built-in tokenizer on the project's text and tokenizing…"
    } else {
        "tokenizing…"
    });
    let (tokenizer, prepared) = Prepared::for_project(&project, &data)?;
    for t in &prepared.tasks {
        let chained = t.composed.iter().filter(|c| c.is_some()).count();
        if chained > 0 {
            say(&format!(
                "task {}: {chained} of {} training records are chained instructions",
                t.name,
                t.samples.len()
            ));
        }
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
    loaded.prepared.check_fits(&pack)?;
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
    println!(
        "  best-fit decreasing on the same pieces fills {:.2}%; {} of {} chunks mix tasks \
         ({:.1}%; {:.1}% of the {} the sizes allow to mix)",
        packing.best_fit_fill * 100.0,
        packing.chunks.mixed,
        packing.chunks.chunks,
        packing.chunks.share() * 100.0,
        packing.chunks.share_of_mixable() * 100.0,
        packing.chunks.chunks - packing.chunks.unmixable
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
    /// Keep every sample in memory, as the studio does, instead of spilling them to temporary
    /// files beside the output (the spilled path is used whenever the project's tokenizer is a
    /// file and no task chains instructions); for comparing the two.
    #[arg(long, hide = true)]
    pub in_memory: bool,
}

/// Rows per parquet row group (and rows built at a time).
const ROW_GROUP: usize = 1024;

/// Writes packed rows a group at a time into a temporary file that becomes the real one only
/// when everything is written (and is removed if anything fails).
enum RowSink {
    Parquet {
        tmp: tempfile::NamedTempFile,
        writer: Option<Box<parquet::arrow::ArrowWriter<std::fs::File>>>,
    },
    Jsonl {
        tmp: tempfile::NamedTempFile,
        out: std::io::BufWriter<std::fs::File>,
    },
}

impl RowSink {
    fn new(format: PackFormat, dir: &Path) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix(".moi-pack-")
            .tempfile_in(dir)
            .with_context(|| format!("creating a file in {}", dir.display()))?;
        Ok(match format {
            PackFormat::Parquet => RowSink::Parquet { tmp, writer: None },
            PackFormat::Jsonl => {
                let out = std::io::BufWriter::new(tmp.as_file().try_clone()?);
                RowSink::Jsonl { tmp, out }
            }
        })
    }

    fn write(&mut self, rows: &[PackedRow]) -> anyhow::Result<()> {
        match self {
            RowSink::Parquet { tmp, writer } => {
                let column = |get: &dyn Fn(&PackedRow) -> Vec<i32>| -> ArrayRef {
                    let mut b = ListBuilder::new(Int32Builder::new());
                    for r in rows {
                        b.values().append_slice(&get(r));
                        b.append(true);
                    }
                    Arc::new(b.finish())
                };
                let as_i32 = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
                let batch = RecordBatch::try_from_iter([
                    ("input_ids", column(&|r| as_i32(&r.input_ids))),
                    ("labels", column(&|r| r.labels.clone())),
                    ("position_ids", column(&|r| as_i32(&r.position_ids))),
                    ("segment_ids", column(&|r| as_i32(&r.segment_ids))),
                ])?;
                if writer.is_none() {
                    let props = parquet::file::properties::WriterProperties::builder()
                        .set_max_row_group_row_count(Some(ROW_GROUP))
                        .build();
                    *writer = Some(Box::new(parquet::arrow::ArrowWriter::try_new(
                        tmp.as_file().try_clone()?,
                        batch.schema(),
                        Some(props),
                    )?));
                }
                if let Some(w) = writer.as_mut() {
                    w.write(&batch)?;
                }
            }
            RowSink::Jsonl { out, .. } => {
                use std::io::Write;
                for r in rows {
                    serde_json::to_writer(
                        &mut *out,
                        &json!({
                            "input_ids": r.input_ids,
                            "labels": r.labels,
                            "position_ids": r.position_ids,
                            "segment_ids": r.segment_ids,
                        }),
                    )?;
                    out.write_all(b"\n")?;
                }
            }
        }
        Ok(())
    }

    fn finish(self, path: &Path) -> anyhow::Result<()> {
        let tmp = match self {
            RowSink::Parquet { tmp, writer } => {
                let Some(writer) = writer else {
                    bail!("nothing to write: the plan has no rows");
                };
                writer.close()?;
                tmp
            }
            RowSink::Jsonl { tmp, out } => {
                out.into_inner().map_err(|e| e.into_error())?;
                tmp
            }
        };
        tmp.as_file().sync_all()?;
        set_readable(tmp.path())?;
        tmp.persist(path)
            .map_err(|e| anyhow::anyhow!("writing {}: {}", path.display(), e.error))?;
        Ok(())
    }
}

/// What `pack` builds rows from: every sample in memory (the studio's engine), or samples spilled
/// to temporary files so that memory does not grow with the records' text.
trait PackSource {
    fn project(&self) -> &Project;
    fn tokenizer(&self) -> &Tokenizer;
    fn check_fits(&self, pack: &PackSettings) -> Result<(), MixError>;
    fn pack_epoch(&self, pack: &PackSettings, epoch: u32) -> PackPlan;
    fn rows(
        &self,
        plan: &PackPlan,
        range: std::ops::Range<usize>,
        pack: &PackSettings,
    ) -> anyhow::Result<Vec<PackedRow>>;
    /// Appends a sample's conversation as JSON messages separated by commas; see
    /// [`append_messages`].
    fn messages(&self, s: SampleRef, keep_system: bool, out: &mut Vec<u8>) -> anyhow::Result<bool>;
}

impl PackSource for Loaded {
    fn project(&self) -> &Project {
        &self.project
    }
    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    fn check_fits(&self, pack: &PackSettings) -> Result<(), MixError> {
        self.prepared.check_fits(pack)
    }
    fn pack_epoch(&self, pack: &PackSettings, epoch: u32) -> PackPlan {
        self.prepared
            .pack_epoch(&self.project.mixing, pack, self.project.seed, epoch)
    }
    fn rows(
        &self,
        plan: &PackPlan,
        range: std::ops::Range<usize>,
        pack: &PackSettings,
    ) -> anyhow::Result<Vec<PackedRow>> {
        Ok(range.map(|i| self.prepared.row(plan, i, pack)).collect())
    }
    fn messages(&self, s: SampleRef, keep_system: bool, out: &mut Vec<u8>) -> anyhow::Result<bool> {
        let (t, r) = (s.task as usize, s.record as usize);
        let task = &self.project.tasks[t];
        let record = &self.data[t].records[self.prepared.tasks[t].record_index[r]];
        let (json, system) =
            messages_json(&conversation(record, &task.system_prompt, task.system_rule));
        Ok(append_messages(&json, system, keep_system, out))
    }
}

/// The project's samples spilled to files ([`Spilled`]).
struct SpilledSource {
    project: Project,
    tokenizer: Tokenizer,
    spilled: Spilled,
}

impl PackSource for SpilledSource {
    fn project(&self) -> &Project {
        &self.project
    }
    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    fn check_fits(&self, pack: &PackSettings) -> Result<(), MixError> {
        self.spilled.check_fits(pack)
    }
    fn pack_epoch(&self, pack: &PackSettings, epoch: u32) -> PackPlan {
        self.spilled
            .pack_epoch(&self.project.mixing, pack, self.project.seed, epoch)
    }
    fn rows(
        &self,
        plan: &PackPlan,
        range: std::ops::Range<usize>,
        pack: &PackSettings,
    ) -> anyhow::Result<Vec<PackedRow>> {
        self.spilled.rows(plan, range, pack)
    }
    fn messages(&self, s: SampleRef, keep_system: bool, out: &mut Vec<u8>) -> anyhow::Result<bool> {
        self.spilled.messages(s, keep_system, out)
    }
}

/// Whether `pack` can spill this project's samples: the tokenizer is a file (the built-in one
/// learns from all the text at once) and no task composes chains (a chain needs other records).
fn spillable(project: &Project) -> bool {
    project.mixing.tokenizer.is_some()
        && (0..project.tasks.len()).all(|t| !composes_training(project, t))
}

/// Reads and tokenizes the project into temporary files in `dir`, saying what `load` says.
fn load_spilled(project: Project, path: &Path, dir: &Path) -> anyhow::Result<SpilledSource> {
    let tokenizer = load_tokenizer(&project, &project.mixing, &[])?;
    let template = load_template(&project, &project.mixing)?;
    eprintln!("reading and tokenizing…");
    let spilled = Spilled::build(
        &project,
        &tokenizer,
        &template,
        project.mixing.labels,
        dir,
        &mut |_| {},
    )?;
    for t in &spilled.tasks {
        for s in &t.sources {
            if let Some(e) = &s.error {
                eprintln!("warning: {e}");
            }
        }
        for (origin, why) in t.failed.iter().take(5) {
            eprintln!("warning: task {} line {}: {why}", t.name, origin.line);
        }
    }
    if spilled.tasks.iter().all(|t| t.records == 0) {
        bail!("no task of {} has any record to mix", path.display());
    }
    Ok(SpilledSource {
        project,
        tokenizer,
        spilled,
    })
}

/// Writes one row as an openai-messages conversation on one line: the default prompt (in `moi`
/// rows), then each instruction's own system prompt, question and answer. A sample split over
/// several rows is written once, with its first piece; `partial` counts instructions the row
/// holds only in part.
fn write_conversation(
    out: &mut impl std::io::Write,
    source: &dyn PackSource,
    row: &PackedRow,
    buf: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let project = source.project();
    buf.clear();
    buf.extend_from_slice(b"{\"messages\":[");
    let mut tasks: Vec<&str> = Vec::new();
    let (mut partial, mut any) = (0, false);
    for seg in &row.segments {
        match (seg.kind, seg.task, seg.record) {
            (SegmentKind::DefaultPrompt, _, _) => {
                if any {
                    buf.push(b',');
                }
                let system = json!({"role": "system", "content": project.default_system_prompt});
                serde_json::to_writer(&mut *buf, &system)?;
                any = true;
            }
            (SegmentKind::Instruction, Some(task), Some(record)) => {
                if seg.partial {
                    partial += 1;
                }
                if seg.offset > 0 {
                    continue;
                }
                let mark = buf.len();
                if any {
                    buf.push(b',');
                }
                let keep_system = !seg.system.is_empty();
                if source.messages(SampleRef { task, record }, keep_system, buf)? {
                    any = true;
                } else {
                    buf.truncate(mark);
                }
                tasks.push(&project.tasks[task as usize].name);
            }
            _ => {}
        }
    }
    buf.extend_from_slice(b"],\"tasks\":");
    serde_json::to_writer(&mut *buf, &tasks)?;
    buf.extend_from_slice(format!(",\"partial\":{partial}}}\n").as_bytes());
    out.write_all(buf)?;
    Ok(())
}

/// Runs `pack`: rows are built and written a group at a time, epoch after epoch.
pub fn run_pack(args: PackArgs) -> anyhow::Result<i32> {
    let project = Project::load(&args.project)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let source: Box<dyn PackSource> = if spillable(&project) && !args.in_memory {
        Box::new(load_spilled(project, &args.project, &args.out)?)
    } else {
        Box::new(load_data(project, &args.project, false)?)
    };
    write_pack(&args, source.as_ref())
}

/// Samples, packs and writes every epoch's rows, the mixed conversations, the tokenizer and the
/// manifest into `args.out`.
fn write_pack(args: &PackArgs, source: &dyn PackSource) -> anyhow::Result<i32> {
    let project = source.project();
    let pack = pack_settings(project, args.mode);
    source.check_fits(&pack)?;
    let mut sink = RowSink::new(args.format, &args.out)?;
    let mixed_tmp = tempfile::Builder::new()
        .prefix(".moi-mixed-")
        .tempfile_in(&args.out)?;
    let mut mixed = std::io::BufWriter::new(mixed_tmp.as_file().try_clone()?);
    // Every epoch is sampled and packed afresh (balanced sampling reshuffles per epoch).
    let epochs = project.mixing.epochs.max(1);
    let (mut rows, mut tokens) = (0usize, 0u64);
    let mut buf = Vec::new();
    for epoch in 0..epochs {
        let plan = source.pack_epoch(&pack, epoch);
        for start in (0..plan.rows.len()).step_by(ROW_GROUP) {
            let end = (start + ROW_GROUP).min(plan.rows.len());
            let built = source.rows(&plan, start..end, &pack)?;
            sink.write(&built)?;
            for r in &built {
                tokens += r.input_ids.len() as u64;
                write_conversation(&mut mixed, source, r, &mut buf)?;
            }
            rows += built.len();
        }
    }
    let packed_path = args.out.join(match args.format {
        PackFormat::Parquet => "packed.parquet",
        PackFormat::Jsonl => "packed.jsonl",
    });
    sink.finish(&packed_path)?;
    mixed.into_inner().map_err(|e| e.into_error())?;
    mixed_tmp.as_file().sync_all()?;
    set_readable(mixed_tmp.path())?;
    let mixed_path = args.out.join("mixed.jsonl");
    mixed_tmp
        .persist(&mixed_path)
        .map_err(|e| anyhow::anyhow!("writing {}: {}", mixed_path.display(), e.error))?;
    let tokenizer_path = args.out.join("tokenizer.json");
    source
        .tokenizer()
        .save(&tokenizer_path, false)
        .map_err(|e| anyhow::anyhow!("saving {}: {e}", tokenizer_path.display()))?;
    let fill = tokens as f64 / (rows.max(1) as f64 * pack.max_seq_len as f64);
    let manifest = json!({
        "rows": rows,
        "epochs": epochs,
        "tokens": tokens,
        "fill": fill,
        "packing": pack,
        "mixing": project.mixing,
        "default_system_prompt": project.default_system_prompt,
        "tasks": project.tasks.iter().map(|t| json!({"name": t.name, "system_prompt": t.system_prompt})).collect::<Vec<_>>(),
        "attention": "token i may attend to token j when j <= i and (segment_ids[j] == 0 or \
                      segment_ids[j] == segment_ids[i]); segment 0 is the row's shared prefix (the \
                      default system prompt in moi rows) or, with full attention, the whole row. \
                      Rows are not padded. With reset position ids, positions restart after the prefix.",
        "labels": "-100 marks tokens that are not trained; labels are not shifted",
    });
    write_atomic(
        &args.out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    println!(
        "{rows} rows ({epochs} epoch{}, {} mode, fill {:.2}%) written to {} and {}; tokenizer and \
         manifest beside them",
        if epochs == 1 { "" } else { "s" },
        pack.mode.as_str(),
        fill * 100.0,
        packed_path.display(),
        mixed_path.display(),
    );
    Ok(0)
}
