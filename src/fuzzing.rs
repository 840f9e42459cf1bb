//! Entry points for fuzzing every parser the studio runs on a user's files.
//!
//! Each function takes raw bytes, drives one parser the way the studio does, and panics only when
//! an invariant the rest of the studio relies on is broken (a span outside the rendered text, a
//! saved project that does not load again …). Errors are fine: bad input must give a message,
//! never a panic, a hang or unbounded memory. The cargo-fuzz targets in `fuzz/` call these, and
//! `tests/fuzz_smoke.rs` runs them over the seed corpus and mutations of it in every test run.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::core::import::{ColumnMapping, ImportOptions, Layout, detect_format, import_all};
use crate::core::project::Project;
use crate::core::record::Origin;
use crate::core::runs::{RunHistory, cut_metrics};
use crate::core::template::{ChatMessage, ChatTemplate};

/// The parsers, one fuzz target each.
pub const TARGETS: [&str; 11] = [
    "import_jsonl",
    "import_json",
    "import_csv",
    "import_parquet",
    "import_gzip",
    "column_mapping",
    "chat_template",
    "project_file",
    "gguf_header",
    "safetensors_header",
    "metrics_reload",
];

/// Runs the named target on `data` and says whether the input was taken (parsed, loaded,
/// rendered) rather than refused with an error. Unknown names panic: a mistake in the caller.
pub fn run(target: &str, data: &[u8]) -> bool {
    match target {
        "import_jsonl" => import_named("input.jsonl", data),
        "import_json" => import_named("input.json", data),
        "import_csv" => import_named("input.csv", data),
        "import_parquet" => import_named("input.parquet", data),
        "import_gzip" => import_gzip(data),
        "column_mapping" => column_mapping(data),
        "chat_template" => chat_template(data),
        "project_file" => project_file(data),
        "gguf_header" => gguf_header(data),
        "safetensors_header" => safetensors_header(data),
        "metrics_reload" => metrics_reload(data),
        other => panic!("no fuzz target named {other}"),
    }
}

thread_local! {
    /// One scratch folder per thread, reused across inputs: files are overwritten, not created.
    static SCRATCH: tempfile::TempDir = tempfile::Builder::new()
        .prefix("moi-fuzz-")
        .tempdir()
        .expect("a scratch folder for fuzz inputs");
}

/// Writes `data` to `name` in this thread's scratch folder and returns its path.
fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    SCRATCH.with(|dir| {
        let path = dir.path().join(name);
        let mut file = std::fs::File::create(&path).expect("scratch file");
        file.write_all(data).expect("scratch write");
        path
    })
}

/// Imports `data` as a file called `name`, then checks the report adds up.
fn import_named(name: &str, data: &[u8]) -> bool {
    let path = scratch_file(name, data);
    let options = ImportOptions::default();
    match import_all(&path, &options) {
        Ok((records, report)) => {
            check_import(&records, &report);
            report.records > 0
        }
        Err(_) => false,
    }
}

fn check_import(
    records: &[crate::core::record::Record],
    report: &crate::core::import::ImportReport,
) {
    assert_eq!(
        records.len() as u64,
        report.records,
        "report counts every record kept"
    );
    assert!(report.rejections.len() as u64 <= report.rejected);
    for r in records {
        assert!(
            r.origin.line >= 1,
            "a record's line counts from 1: {:?}",
            r.origin
        );
    }
}

/// The first byte picks how the rest is read: even, the rest is compressed and imported as
/// `.jsonl.gz`; odd, the rest is taken as gzip bytes as they are (after the gzip magic).
fn import_gzip(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let bytes = if mode % 2 == 0 {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(rest).expect("compressing in memory");
        enc.finish().expect("compressing in memory")
    } else {
        let mut raw = vec![0x1f, 0x8b];
        raw.extend_from_slice(rest);
        raw
    };
    import_named("input.jsonl.gz", &bytes)
}

/// First line: `role=field` pairs separated by `;`. The rest: one JSON value, read as a record
/// under that mapping, and under the format detected from it.
fn column_mapping(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let (head, body) = text.split_once('\n').unwrap_or((&text, ""));
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        return false;
    };
    let mut taken = false;
    let origin = Origin { source: 0, line: 1 };
    let pairs: Vec<&str> = head.split(';').filter(|p| !p.is_empty()).collect();
    if let Ok(mapping) = ColumnMapping::parse_pairs(&pairs) {
        let layout = Layout::Mapped(mapping);
        let _ = layout.name();
        let _ = layout.required_fields();
        if let Ok(record) = layout.parse(&value, origin) {
            check_record(&record);
            taken = true;
        }
    }
    if let Some(format) = detect_format([&value])
        && let Ok(record) = Layout::Format(format).parse(&value, origin)
    {
        check_record(&record);
        taken = true;
    }
    taken
}

/// The importers' promise: at least one user turn and one assistant turn with text.
fn check_record(record: &crate::core::record::Record) {
    use crate::core::record::Role;
    assert!(record.turns.iter().any(|t| t.role == Role::User));
    assert!(
        record
            .turns
            .iter()
            .any(|t| t.role == Role::Assistant && !t.content.is_empty())
    );
    assert!(record.turns.iter().all(|t| t.role != Role::System));
}

/// Template source, a zero byte, then messages separated by byte 1; each message's first byte
/// picks its role. The template is compiled and probed as the studio does, then the messages are
/// rendered with their spans found.
fn chat_template(data: &[u8]) -> bool {
    let (source, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let source = String::from_utf8_lossy(source);
    let Ok(template) = ChatTemplate::from_source(&source, "<s>", "</s>") else {
        return false;
    };
    const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];
    let messages: Vec<ChatMessage> = rest
        .split(|&b| b == 1)
        .filter_map(|m| m.split_first())
        .map(|(&role, text)| ChatMessage {
            role: ROLES[role as usize % ROLES.len()].to_string(),
            content: String::from_utf8_lossy(text).into_owned(),
        })
        .collect();
    let rendered = template.render_with_spans(&messages);
    if let Ok(rendered) = &rendered {
        assert_eq!(rendered.spans.len(), messages.len());
        for span in &rendered.spans {
            let r = &span.range;
            assert!(
                r.start <= r.end && r.end <= rendered.text.len(),
                "span {r:?} outside text of {} bytes",
                rendered.text.len()
            );
            assert!(
                rendered.text.is_char_boundary(r.start) && rendered.text.is_char_boundary(r.end),
                "span {r:?} cuts a character"
            );
        }
        for r in rendered.assistant_ranges() {
            assert!(r.end <= rendered.text.len());
        }
    }
    let json: Value = serde_json::to_value(&messages).expect("messages as JSON");
    let _ = template.render_json(&json, None, true);
    rendered.is_ok()
}

/// A project file: loaded, and when it loads, saved text must load again to the same project.
fn project_file(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let path = Path::new("fuzz.moi.toml");
    let Ok(project) = Project::from_toml(text, path) else {
        return false;
    };
    let saved = project.to_toml();
    let again = Project::from_toml(&saved, path)
        .unwrap_or_else(|e| panic!("a loaded project saves to text that does not load: {e}"));
    assert_eq!(
        again.to_toml(),
        saved,
        "saving a reloaded project changes it"
    );
    true
}

/// A GGUF header: metadata and tensor index, then the tokenizer rebuilt from it.
fn gguf_header(data: &[u8]) -> bool {
    let mut reader = Cursor::new(data);
    crate::train::gguf::gguf_text_side_from(&mut reader, Path::new("fuzz.gguf")).is_ok()
}

/// A safetensors file: header and tensors.
fn safetensors_header(data: &[u8]) -> bool {
    match crate::train::load::read_safetensors(data, Path::new("fuzz.safetensors")) {
        Ok(tensors) => {
            for tensor in tensors.values() {
                assert!(tensor.elem_count() * tensor.dtype().size_in_bytes() <= data.len());
            }
            true
        }
        Err(_) => false,
    }
}

/// A run's `metrics.jsonl`: reloaded for the plots, cut back to a checkpoint's step as resume
/// does (the first byte picks the step), and reloaded again.
fn metrics_reload(data: &[u8]) -> bool {
    let Some((&step, rest)) = data.split_first() else {
        return false;
    };
    let path = scratch_file("metrics.jsonl", rest);
    let dir = path.parent().expect("scratch folder");
    if RunHistory::load(dir).is_err() {
        return false;
    }
    let step = u64::from(step);
    cut_metrics(&path, step).expect("cutting metrics in the scratch folder");
    let (after, _) = RunHistory::load(dir).expect("reloading cut metrics");
    assert!(
        after.step <= step,
        "the cut history reaches step {} beyond {step}",
        after.step
    );
    after.step > 0
}
