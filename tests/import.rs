//! Import on real shipped datasets and on hand-made bad files.

use std::io::Write;
use std::path::{Path, PathBuf};

use moi_studio::core::import::{
    ColumnMapping, FileKind, Format, ImportError, ImportOptions, import_all, import_file,
};
use moi_studio::core::record::Role;

mod common;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn data(name: &str) -> PathBuf {
    root().join("tests/data").join(name)
}

fn asset(name: &str) -> PathBuf {
    root().join("assets/datasets").join(name)
}

fn auto() -> ImportOptions {
    ImportOptions::default()
}

#[test]
fn shipped_gsm8k_is_alpaca_jsonl() {
    let (records, report) = import_all(&asset("gsm8k.jsonl"), &auto()).unwrap();
    assert_eq!(report.kind, FileKind::Jsonl);
    assert_eq!(report.format, "alpaca");
    assert_eq!((report.records, report.rejected), (100, 0));
    assert_eq!(records.len(), 100);
    assert!(records.iter().all(|r| r.turns[1].content.contains("#### ")));
    assert_eq!(records[41].origin.line, 42);
}

#[test]
fn shipped_humaneval_is_an_openai_json_array() {
    let (records, report) = import_all(&asset("humaneval.json"), &auto()).unwrap();
    assert_eq!(report.kind, FileKind::Json);
    assert_eq!(report.format, "openai");
    assert_eq!((report.records, report.rejected), (164, 0));
    assert!(records[0].turns[0].content.contains("has_close_elements"));
    assert_eq!(records[0].turns[1].role, Role::Assistant);
}

#[test]
fn shipped_bfcl_is_sharegpt_jsonl() {
    let (records, report) = import_all(&asset("bfcl_simple.jsonl"), &auto()).unwrap();
    assert_eq!(report.format, "sharegpt");
    assert_eq!((report.records, report.rejected), (400, 0));
    let call: serde_json::Value = serde_json::from_str(&records[0].turns[1].content).unwrap();
    assert_eq!(call["name"], "calculate_triangle_area");
}

#[test]
fn bad_records_are_rejected_one_by_one_and_good_ones_kept() {
    let (records, report) = import_all(&data("bad_records.jsonl"), &auto()).unwrap();
    assert_eq!(report.format, "alpaca");
    assert_eq!(records.len(), 3);
    let lines: Vec<u64> = records.iter().map(|r| r.origin.line).collect();
    assert_eq!(lines, [1, 6, 11]);
    assert_eq!(report.rejected, 7);
    let reason = |line: u64| {
        report
            .rejections
            .iter()
            .find(|r| r.line == line)
            .map(|r| r.reason.clone())
            .unwrap_or_else(|| panic!("no rejection for line {line}: {report:?}"))
    };
    assert_eq!(reason(2), "\"output\" is a number, expected text");
    assert_eq!(reason(3), "missing field \"output\"");
    assert!(
        reason(4).starts_with("the record is cut off"),
        "{}",
        reason(4)
    );
    assert_eq!(
        reason(7),
        "not JSON: the record starts with \"this line is not json at all\""
    );
    assert_eq!(reason(8), "expected a JSON object, found a list");
    assert_eq!(reason(9), "the last assistant message is empty");
    assert_eq!(reason(10), "\"instruction\" is null, expected text");
}

#[test]
fn truncated_json_array_keeps_complete_records() {
    let (records, report) = import_all(&data("truncated.json"), &auto()).unwrap();
    assert_eq!(records.len(), 2);
    let why = report.stopped_early.expect("the break is reported");
    assert!(why.contains("cut off") && why.contains("line 26"), "{why}");
}

#[test]
fn invalid_utf8_line_is_rejected_alone() {
    let (records, report) = import_all(&data("not_utf8.jsonl"), &auto()).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(report.rejections.len(), 1);
    assert_eq!(report.rejections[0].line, 2);
    assert!(
        report.rejections[0].reason.contains("not valid UTF-8"),
        "{:?}",
        report.rejections
    );
}

#[test]
fn whole_file_problems_get_their_own_messages() {
    let msg = |name: &str| import_all(&data(name), &auto()).unwrap_err().to_string();
    let empty = msg("empty.jsonl");
    assert!(
        empty.starts_with("the file is empty") && empty.contains("empty.jsonl"),
        "{empty}"
    );
    assert!(msg("blank.jsonl").starts_with("the file is empty"));
    let csv = msg("csv_named_jsonl.jsonl");
    assert!(
        csv.contains("does not look like JSON") && csv.contains("question,answer"),
        "{csv}"
    );
    let png = msg("image.jsonl");
    assert!(png.contains("looks like a PNG image"), "{png}");
    let unknown = msg("unknown_format.jsonl");
    assert!(
        unknown.contains("cannot tell the dataset format")
            && unknown.contains("\"text\", \"label\""),
        "{unknown}"
    );
    let missing = import_all(&root().join("tests/data/nope.jsonl"), &auto()).unwrap_err();
    assert!(matches!(missing, ImportError::Io { .. }), "{missing}");
}

#[test]
fn a_50_mb_line_is_rejected_without_losing_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    writeln!(f, r#"{{"prompt": "short", "completion": "ok"}}"#).unwrap();
    write!(f, r#"{{"prompt": "long", "completion": ""#).unwrap();
    let chunk = "x".repeat(1 << 20);
    for _ in 0..50 {
        f.write_all(chunk.as_bytes()).unwrap();
    }
    writeln!(f, r#""}}"#).unwrap();
    writeln!(f, r#"{{"prompt": "after", "completion": "still here"}}"#).unwrap();
    drop(f);
    let (records, report) = import_all(&path, &auto()).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].turns[1].content, "still here");
    assert_eq!(report.rejections[0].line, 2);
    assert!(
        report.rejections[0]
            .reason
            .contains("50.0 MiB long, over the 16.0 MiB limit"),
        "{}",
        report.rejections[0].reason
    );
}

#[test]
fn report_lists_100_rejections_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.jsonl");
    let mut text = String::new();
    for i in 0..40 {
        text.push_str(&format!(
            "{{\"prompt\": \"q{i}\", \"completion\": \"a\"}}\n"
        ));
    }
    for _ in 0..250 {
        text.push_str("{\"prompt\": \"q\", \"completion\": 1}\n");
    }
    std::fs::write(&path, text).unwrap();
    let (records, report) = import_all(&path, &auto()).unwrap();
    assert_eq!(records.len(), 40);
    assert_eq!(report.rejected, 250);
    assert_eq!(report.rejections.len(), 100);
    assert_eq!(report.unlisted_rejections(), 150);
    assert!(report.to_string().contains("… and 150 more rejected"));
}

#[test]
fn csv_needs_a_mapping_and_reports_rows() {
    // Without a mapping the columns match no format.
    let err = import_all(&data("code.csv"), &auto()).unwrap_err();
    assert!(matches!(err, ImportError::UnknownFormat { .. }), "{err}");
    // A mapping naming a missing column is refused up front, listing the columns.
    let wrong = ImportOptions {
        mapping: ColumnMapping::parse_pairs(&["user=question", "assistant=answer"]).unwrap(),
        ..auto()
    };
    let msg = import_all(&data("code.csv"), &wrong)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("missing column \"answer\"")
            && msg.contains("\"question\", \"solution\", \"difficulty\""),
        "{msg}"
    );
    let options = ImportOptions {
        mapping: ColumnMapping::parse_pairs(&["user=question", "assistant=solution"]).unwrap(),
        ..auto()
    };
    let (records, report) = import_all(&data("code.csv"), &options).unwrap();
    assert_eq!(report.kind, FileKind::Csv);
    assert_eq!(records.len(), 3);
    assert_eq!(
        records[0].turns[1].content,
        "def add(a, b):\n    return a + b"
    );
    assert_eq!(records[1].origin.line, 4);
    let reasons: Vec<(u64, &str)> = report
        .rejections
        .iter()
        .map(|r| (r.line, r.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [
            (6, "has 2 fields, the header has 3"),
            (7, "the last assistant message is empty")
        ]
    );
}

#[test]
fn tsv_and_wrapped_json() {
    let (records, report) = import_all(&data("code.tsv"), &auto()).unwrap();
    assert_eq!(
        (report.kind, report.format.as_str()),
        (FileKind::Tsv, "prompt_completion")
    );
    assert_eq!(records[1].turns[1].content, "Bye!");
    let (records, report) = import_all(&data("wrapped.json"), &auto()).unwrap();
    assert_eq!(report.format, "sharegpt");
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].origin.line, 22);
}

#[test]
fn explicit_format_overrides_detection() {
    let options = ImportOptions {
        format: Some(Format::Openai),
        ..auto()
    };
    let (records, report) = import_all(&asset("gsm8k.jsonl"), &options).unwrap();
    assert!(records.is_empty());
    assert_eq!(report.rejected, 100);
    assert_eq!(report.rejections[0].reason, "missing field \"messages\"");
}

fn gzip(src: &Path, dst: &Path, keep_bytes: Option<usize>) {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&std::fs::read(src).unwrap()).unwrap();
    let mut bytes = enc.finish().unwrap();
    if let Some(n) = keep_bytes {
        bytes.truncate(n);
    }
    std::fs::write(dst, bytes).unwrap();
}

#[test]
fn gzip_files_import_and_a_cut_gzip_keeps_what_it_had() {
    let dir = tempfile::tempdir().unwrap();
    let gz = dir.path().join("bfcl.jsonl.gz");
    gzip(&asset("bfcl_simple.jsonl"), &gz, None);
    let (records, report) = import_all(&gz, &auto()).unwrap();
    assert!(report.gzip);
    assert_eq!(records.len(), 400);

    let cut = dir.path().join("cut.jsonl.gz");
    let full = std::fs::metadata(&gz).unwrap().len() as usize;
    gzip(&asset("bfcl_simple.jsonl"), &cut, Some(full / 2));
    let (records, report) = import_all(&cut, &auto()).unwrap();
    assert!(
        records.len() > 100 && records.len() < 400,
        "{}",
        records.len()
    );
    assert!(
        report.stopped_early.is_some() || report.rejected > 0,
        "{report:?}"
    );
}

#[test]
fn progress_reaches_the_file_size() {
    let path = asset("bfcl_simple.jsonl");
    let size = std::fs::metadata(&path).unwrap().len();
    let mut seen = Vec::new();
    let mut n = 0;
    import_file(&path, &auto(), &mut |_| n += 1, &mut |p| seen.push(p)).unwrap();
    assert_eq!(n, 400);
    let last = seen.last().unwrap();
    assert_eq!((last.bytes_done, last.bytes_total), (size, size));
    assert!(seen.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done));
}

/// Writes a parquet file with one flat alpaca table and one nested sharegpt table.
fn write_parquet(path: &Path, sharegpt: bool) {
    std::fs::write(path, common::parquet_bytes(sharegpt)).unwrap();
}

#[test]
fn parquet_flat_and_nested() {
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("alpaca.parquet");
    write_parquet(&flat, false);
    let (records, report) = import_all(&flat, &auto()).unwrap();
    assert_eq!(
        (report.kind, report.format.as_str()),
        (FileKind::Parquet, "alpaca")
    );
    assert_eq!(records.len(), 2);
    assert_eq!(report.rejections[0].line, 2);
    assert_eq!(
        report.rejections[0].reason,
        "\"output\" is null, expected text"
    );
    assert!(report.to_string().contains("row 2:"));

    let nested = dir.path().join("chat.parquet");
    write_parquet(&nested, true);
    let (records, report) = import_all(&nested, &auto()).unwrap();
    assert_eq!(report.format, "sharegpt");
    assert_eq!(records.len(), 5);
    assert_eq!(records[4].turns[1].content, "hi 4");

    let fake = dir.path().join("fake.parquet");
    std::fs::write(&fake, "{\"a\": 1}\n").unwrap();
    let msg = import_all(&fake, &auto()).unwrap_err().to_string();
    assert!(msg.contains("PAR1"), "{msg}");
}

/// Fuzzing found a parquet file whose dictionary page claims about 1.8 billion values in a few
/// bytes; the parquet crate reserved 29.6 GB for it and the process aborted. The importer now
/// refuses the page by name before anything is reserved.
#[test]
fn a_dictionary_page_claiming_more_values_than_it_holds_is_refused() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions/import_parquet/dictionary-claims-billions-of-values.parquet");
    let msg = match import_all(&path, &auto()) {
        Err(e) => e.to_string(),
        Ok((records, report)) => {
            assert!(records.is_empty());
            report.to_string()
        }
    };
    assert!(msg.contains("dictionary page claims"), "{msg}");
    assert!(
        msg.contains("dictionary-claims-billions-of-values.parquet"),
        "{msg}"
    );
}
