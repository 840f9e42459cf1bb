//! Importing task datasets: JSONL, JSON, CSV/TSV and parquet files (plain or gzip), in alpaca,
//! sharegpt, openai-messages or prompt/completion form, read as a stream.
//!
//! Bad records are rejected one by one with their line (or row) and reason while the good ones are
//! kept; a file that breaks off part-way keeps what came before the break.

pub mod format;
pub mod json_stream;
mod sources;

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

pub use format::{ColumnMapping, Format, Layout, MapRole, detect_format};

use crate::core::record::{Origin, Record};
use sources::{Item, Stop, ValueSource};

/// How many rejections a report lists one by one; the rest are only counted.
pub const MAX_LISTED_REJECTIONS: usize = 100;
/// How many of the first records format detection looks at.
const DETECT_SAMPLE: usize = 32;
/// Default limit on one record's size in bytes.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 16 << 20;

/// The kind of file, from its content and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// One JSON object per line.
    Jsonl,
    /// A JSON array of records, or an object holding one.
    Json,
    /// Comma-separated values with a header row.
    Csv,
    /// Tab-separated values with a header row.
    Tsv,
    /// Apache Parquet.
    Parquet,
}

impl FileKind {
    /// Whether positions in this kind of file are rows rather than lines.
    pub fn position_unit(self) -> &'static str {
        match self {
            FileKind::Parquet => "row",
            _ => "line",
        }
    }
}

/// Options for one import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The format, or `None` to detect it from the first records.
    pub format: Option<Format>,
    /// Field names to read roles from; when not empty it wins over `format`.
    pub mapping: ColumnMapping,
    /// Records longer than this many bytes are rejected without being parsed.
    pub max_record_bytes: usize,
    /// Index of this file among its task's sources, written into each record's origin.
    pub source_index: u32,
    /// A numeric field read into each record's difficulty score (phased training).
    pub score_field: Option<String>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            format: None,
            mapping: ColumnMapping::default(),
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            source_index: 0,
            score_field: None,
        }
    }
}

/// Progress of an import, in bytes of the file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportProgress {
    /// Bytes read so far.
    pub bytes_done: u64,
    /// Size of the file.
    pub bytes_total: u64,
}

/// One rejected record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// Line (text files) or row (parquet) of the record, from 1.
    pub line: u64,
    /// Why it was rejected.
    pub reason: String,
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The file read.
    pub file: PathBuf,
    /// The kind of file it turned out to be.
    pub kind: FileKind,
    /// Whether it was gzip-compressed.
    pub gzip: bool,
    /// The format or column mapping used (detected or given).
    pub format: String,
    /// Records imported.
    pub records: u64,
    /// Records rejected.
    pub rejected: u64,
    /// The first [`MAX_LISTED_REJECTIONS`] rejections.
    pub rejections: Vec<Rejection>,
    /// Set when the file broke off before its end: where and why. Records before it are kept.
    pub stopped_early: Option<String>,
    /// Size of the file in bytes.
    pub bytes: u64,
}

impl ImportReport {
    /// Adds a rejection, listing it if there is room.
    fn reject(&mut self, line: u64, reason: String) {
        self.rejected += 1;
        if self.rejections.len() < MAX_LISTED_REJECTIONS {
            self.rejections.push(Rejection { line, reason });
        }
    }

    /// Rejections beyond the listed ones.
    pub fn unlisted_rejections(&self) -> u64 {
        self.rejected - self.rejections.len() as u64
    }
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = self.kind.position_unit();
        writeln!(
            f,
            "{}: {} records imported, {} rejected ({}{} {}, format {})",
            self.file.display(),
            self.records,
            self.rejected,
            if self.gzip { "gzip " } else { "" },
            format!("{:?}", self.kind).to_lowercase(),
            human_bytes(self.bytes),
            self.format
        )?;
        for r in &self.rejections {
            writeln!(f, "  {unit} {}: {}", r.line, r.reason)?;
        }
        if self.unlisted_rejections() > 0 {
            writeln!(f, "  … and {} more rejected", self.unlisted_rejections())?;
        }
        if let Some(why) = &self.stopped_early {
            writeln!(f, "  stopped early: {why}")?;
        }
        Ok(())
    }
}

/// Why a file could not be imported at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file holds nothing.
    #[error("the file is empty ({})", path.display())]
    Empty { path: PathBuf },
    /// The file is not text in a way we can read.
    #[error("{why} ({})", path.display())]
    NotText { path: PathBuf, why: String },
    /// The content is not the kind of file its name or first bytes say.
    #[error("{why} ({})", path.display())]
    WrongKind { path: PathBuf, why: String },
    /// No known dataset format matches the records.
    #[error(
        "cannot tell the dataset format: the first record has fields {fields}; expected alpaca \
         (instruction/output), sharegpt (conversations), openai (messages) or prompt/completion; \
         pass --format or map fields with --map role=field ({})",
        path.display()
    )]
    UnknownFormat { path: PathBuf, fields: String },
    /// A column the format or mapping needs is not in the file's header.
    #[error("missing column \"{column}\"; the columns are {available} ({})", path.display())]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: String,
    },
    /// The parquet file could not be opened.
    #[error("not a readable parquet file: {why} ({})", path.display())]
    Parquet { path: PathBuf, why: String },
}

/// Reads every record of `path`, passing good ones to `sink` and reporting progress, and returns
/// the report. Memory use does not grow with the file: records go to `sink` as they are read.
pub fn import_file(
    path: &Path,
    options: &ImportOptions,
    sink: &mut dyn FnMut(Record),
    progress: &mut dyn FnMut(ImportProgress),
) -> Result<ImportReport, ImportError> {
    let io_err = |source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let bytes_total = file.metadata().map_err(io_err)?.len();
    if bytes_total == 0 {
        return Err(ImportError::Empty {
            path: path.to_path_buf(),
        });
    }
    let counter = sources::Counter::default();
    let mut raw = BufReader::with_capacity(1 << 16, counter.wrap(file));
    let head = raw.fill_buf().map_err(io_err)?;
    let gzip = head.starts_with(&[0x1f, 0x8b]);
    let parquet = head.starts_with(b"PAR1");

    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let stem = name.strip_suffix(".gz").unwrap_or(&name);
    let by_name = if stem.ends_with(".csv") {
        Some(FileKind::Csv)
    } else if stem.ends_with(".tsv") {
        Some(FileKind::Tsv)
    } else if stem.ends_with(".parquet") || stem.ends_with(".pq") {
        Some(FileKind::Parquet)
    } else if stem.ends_with(".json") {
        Some(FileKind::Json)
    } else if stem.ends_with(".jsonl") || stem.ends_with(".ndjson") {
        Some(FileKind::Jsonl)
    } else {
        None
    };

    let mut report = ImportReport {
        file: path.to_path_buf(),
        kind: by_name.unwrap_or(FileKind::Jsonl),
        gzip,
        format: String::new(),
        records: 0,
        rejected: 0,
        rejections: Vec::new(),
        stopped_early: None,
        bytes: bytes_total,
    };

    if parquet {
        report.kind = FileKind::Parquet;
        drop(raw);
        let source = sources::ParquetSource::open(path, bytes_total)?;
        return run(source, options, report, sink, progress);
    }
    if by_name == Some(FileKind::Parquet) {
        return Err(ImportError::WrongKind {
            path: path.to_path_buf(),
            why: "the file is named .parquet but does not start with parquet's PAR1 marker"
                .to_string(),
        });
    }

    let text: Box<dyn Read + Send> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(raw))
    } else {
        Box::new(raw)
    };
    let mut text = BufReader::with_capacity(1 << 16, text);
    let head = text.fill_buf().map_err(|e| {
        if gzip {
            ImportError::NotText {
                path: path.to_path_buf(),
                why: format!("the gzip data cannot be unpacked: {e}"),
            }
        } else {
            io_err(e)
        }
    })?;
    check_text_head(path, head)?;
    let first = head
        .iter()
        .copied()
        .find(|b| !(b.is_ascii_whitespace() || [0xEF, 0xBB, 0xBF].contains(b)));
    if first.is_none() && head.len() < (1 << 16) {
        return Err(ImportError::Empty {
            path: path.to_path_buf(),
        });
    }

    report.kind = match by_name {
        Some(FileKind::Csv) => FileKind::Csv,
        Some(FileKind::Tsv) => FileKind::Tsv,
        // A JSON array is read as one whatever the file is called; likewise JSON Lines.
        _ if first == Some(b'[') => FileKind::Json,
        Some(FileKind::Json) if first == Some(b'{') && !looks_like_jsonl(head) => FileKind::Json,
        _ => FileKind::Jsonl,
    };
    if matches!(report.kind, FileKind::Jsonl | FileKind::Json)
        && !matches!(first, Some(b'{') | Some(b'['))
    {
        let shown: String = String::from_utf8_lossy(&head[..head.len().min(40)])
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        return Err(ImportError::WrongKind {
            path: path.to_path_buf(),
            why: format!(
                "this does not look like JSON: line 1 starts with \"{shown}\"; expected JSON \
                 objects (name CSV files .csv, TSV files .tsv)"
            ),
        });
    }
    let max = options.max_record_bytes;
    match report.kind {
        FileKind::Jsonl => run(
            sources::JsonlSource::new(text, counter, max),
            options,
            report,
            sink,
            progress,
        ),
        FileKind::Json => run(
            sources::JsonArraySource::new(text, counter, max),
            options,
            report,
            sink,
            progress,
        ),
        FileKind::Csv | FileKind::Tsv => {
            let delimiter = if report.kind == FileKind::Tsv {
                b'\t'
            } else {
                b','
            };
            let source = sources::CsvSource::new(path, text, counter, delimiter)?;
            check_columns(path, &source.headers, options)?;
            run(source, options, report, sink, progress)
        }
        FileKind::Parquet => unreachable!("parquet handled above"),
    }
}

/// Imports a whole file into memory: the records and the report.
pub fn import_all(
    path: &Path,
    options: &ImportOptions,
) -> Result<(Vec<Record>, ImportReport), ImportError> {
    let mut records = Vec::new();
    let report = import_file(path, options, &mut |r| records.push(r), &mut |_| {})?;
    Ok((records, report))
}

/// Refuses binary and UTF-16 content with a message that says what it is.
fn check_text_head(path: &Path, head: &[u8]) -> Result<(), ImportError> {
    let not_text = |why: &str| ImportError::NotText {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    if head.starts_with(&[0xFF, 0xFE]) || head.starts_with(&[0xFE, 0xFF]) {
        return Err(not_text(
            "the file is UTF-16 text; save it as UTF-8 and import it again",
        ));
    }
    let sniff = &head[..head.len().min(8192)];
    if sniff.contains(&0) {
        let what = if sniff.starts_with(b"PK\x03\x04") {
            "a zip archive"
        } else if sniff.starts_with(b"\x89PNG") {
            "a PNG image"
        } else if sniff.starts_with(b"%PDF") {
            "a PDF document"
        } else {
            "a binary file"
        };
        return Err(not_text(&format!(
            "this looks like {what}, not a text dataset (it holds zero bytes)"
        )));
    }
    Ok(())
}

/// Whether the start of a `.json` file is really JSON Lines: a complete object on line 1 and
/// another object starting on a later line.
fn looks_like_jsonl(head: &[u8]) -> bool {
    let mut lines = head
        .split(|&b| b == b'\n')
        .filter(|l| !l.trim_ascii().is_empty());
    match (lines.next(), lines.next()) {
        (Some(a), Some(b)) => {
            serde_json::from_slice::<Value>(a).is_ok_and(|v| v.is_object())
                && b.trim_ascii_start().starts_with(b"{")
        }
        _ => false,
    }
}

/// Checks a CSV header has the columns the format or mapping needs.
fn check_columns(
    path: &Path,
    headers: &[String],
    options: &ImportOptions,
) -> Result<(), ImportError> {
    let layout = if !options.mapping.is_empty() {
        Some(Layout::Mapped(options.mapping.clone()))
    } else {
        options.format.map(Layout::Format)
    };
    let Some(layout) = layout else {
        return Ok(());
    };
    for column in layout.required_fields() {
        if !headers.iter().any(|h| h == column) {
            return Err(ImportError::MissingColumn {
                path: path.to_path_buf(),
                column: column.to_string(),
                available: quote_list(headers.iter().map(String::as_str)),
            });
        }
    }
    Ok(())
}

fn quote_list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<String> = items.map(|s| format!("\"{s}\"")).collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

/// Drives a value source: detects the layout from the first records, then parses every record.
fn run(
    mut source: impl ValueSource,
    options: &ImportOptions,
    mut report: ImportReport,
    sink: &mut dyn FnMut(Record),
    progress: &mut dyn FnMut(ImportProgress),
) -> Result<ImportReport, ImportError> {
    let path = report.file.clone();
    let total = report.bytes;
    let source_index = options.source_index;
    let score_field = options.score_field.as_deref();

    // Look at the first records before deciding how to read them.
    let mut head: Vec<Item> = Vec::new();
    let mut values_seen = 0;
    let mut stop: Option<Stop> = None;
    while values_seen < DETECT_SAMPLE {
        match source.next_item() {
            Ok(Some(item)) => {
                if matches!(item, Item::Value { .. }) {
                    values_seen += 1;
                }
                head.push(item);
            }
            Ok(None) => break,
            Err(s) => {
                stop = Some(s);
                break;
            }
        }
    }
    if values_seen == 0 {
        if let Some(Item::Bad { line, reason }) = head.first() {
            let all_bad = head.len();
            return Err(ImportError::WrongKind {
                path,
                why: format!(
                    "no record could be read: {unit} {line}: {reason}{more}",
                    unit = report.kind.position_unit(),
                    more = if all_bad > 1 {
                        format!(" (and {} more like it)", all_bad - 1)
                    } else {
                        String::new()
                    }
                ),
            });
        }
        if let Some(Stop(why)) = stop {
            return Err(ImportError::WrongKind { path, why });
        }
        return Err(ImportError::Empty { path });
    }

    let layout = if !options.mapping.is_empty() {
        Layout::Mapped(options.mapping.clone())
    } else if let Some(f) = options.format {
        Layout::Format(f)
    } else {
        let values = head.iter().filter_map(|i| match i {
            Item::Value { value, .. } => Some(value),
            Item::Bad { .. } => None,
        });
        match detect_format(values) {
            Some(f) => Layout::Format(f),
            None => {
                let fields = head
                    .iter()
                    .find_map(|i| match i {
                        Item::Value { value, .. } => Some(match value.as_object() {
                            Some(obj) => quote_list(obj.keys().map(String::as_str)),
                            None => format_kind(value),
                        }),
                        Item::Bad { .. } => None,
                    })
                    .unwrap_or_default();
                return Err(ImportError::UnknownFormat { path, fields });
            }
        }
    };
    report.format = layout.name();

    let mut handle = |item: Item, report: &mut ImportReport| match item {
        Item::Value { line, value } => {
            match layout.parse(
                &value,
                Origin {
                    source: source_index,
                    line,
                },
            ) {
                Ok(mut record) => {
                    if let Some(field) = score_field {
                        record.score = numeric_field(&value, field);
                    }
                    report.records += 1;
                    sink(record);
                }
                Err(reason) => report.reject(line, reason),
            }
        }
        Item::Bad { line, reason } => report.reject(line, reason),
    };
    for item in head {
        handle(item, &mut report);
    }
    let mut next_progress = 0u64;
    if stop.is_none() {
        loop {
            match source.next_item() {
                Ok(Some(item)) => handle(item, &mut report),
                Ok(None) => break,
                Err(s) => {
                    stop = Some(s);
                    break;
                }
            }
            let done = source.bytes_done();
            if done >= next_progress {
                progress(ImportProgress {
                    bytes_done: done.min(total),
                    bytes_total: total,
                });
                next_progress = done + (1 << 20);
            }
        }
    }
    report.stopped_early = stop.map(|Stop(why)| why);
    progress(ImportProgress {
        bytes_done: total,
        bytes_total: total,
    });
    Ok(report)
}

/// A record's numeric field (a number, or text that parses as one).
fn numeric_field(value: &Value, field: &str) -> Option<f64> {
    match value.get(field)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
    .filter(|x| x.is_finite())
}

fn format_kind(value: &Value) -> String {
    format!("none (it is {})", format::kind_of(value))
}

/// Bytes as a short human-readable size.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
