//! Import throughput and memory on a large generated file: shows that a multi-gigabyte JSONL (or
//! JSON array) file streams through the importer with flat memory.
//!
//!   cargo bench --bench import -- [SIZE_MIB (default 2048)] [DIR (default the system temp dir)]
//!
//! Prints MiB/s, records/s and the process's peak resident memory (VmHWM) after each import.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use moi_studio::core::import::{ImportOptions, import_file};

/// Peak resident set size of this process in MiB (Linux), or 0 where unknown.
fn peak_rss_mib() -> f64 {
    moi_studio::train::memory::resident_bytes().1 as f64 / 1048576.0
}

/// Writes records of varied length until the file reaches `size` bytes; as a JSON array when
/// `array` is set. Returns the number of records written.
fn generate(path: &Path, size: u64, array: bool) -> std::io::Result<u64> {
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let filler = "The quick brown fox jumps over the lazy dog. ".repeat(64);
    let (mut written, mut n) = (0u64, 0u64);
    if array {
        out.write_all(b"[\n")?;
        written += 2;
    }
    while written < size {
        let len = 40 + (n.wrapping_mul(2_654_435_761) % 2_000) as usize;
        let answer = &filler[..len.min(filler.len())];
        let line = format!(
            "{}{{\"instruction\": \"Question number {n}: what comes next?\", \"input\": \"\", \"output\": \"{answer}\"}}",
            if array && n > 0 { ",\n" } else { "" }
        );
        out.write_all(line.as_bytes())?;
        if !array {
            out.write_all(b"\n")?;
        }
        written += line.len() as u64 + 1;
        n += 1;
    }
    if array {
        out.write_all(b"\n]\n")?;
    }
    out.flush()?;
    Ok(n)
}

fn measure(path: &Path, expected: u64) {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let start = Instant::now();
    let mut records = 0u64;
    let mut chars = 0usize;
    let mut progress_calls = 0u64;
    let report = import_file(
        path,
        &ImportOptions::default(),
        &mut |r| {
            records += 1;
            chars += r.text_chars();
        },
        &mut |_| progress_calls += 1,
    )
    .expect("import failed");
    let secs = start.elapsed().as_secs_f64();
    let mib = size as f64 / (1 << 20) as f64;
    assert_eq!(records, expected, "every generated record imports");
    assert_eq!(report.rejected, 0);
    println!(
        "{:<6} {:>8.0} MiB  {:>10} records  {:>6.1} s  {:>7.1} MiB/s  {:>9.0} records/s  \
         peak RSS {:>6.1} MiB  ({} progress reports, {} chars of text)",
        format!("{:?}", report.kind).to_lowercase(),
        mib,
        records,
        secs,
        mib / secs,
        records as f64 / secs,
        peak_rss_mib(),
        progress_calls,
        chars
    );
}

fn main() {
    // `cargo bench` passes --bench; ignore flags.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let size_mib: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(2048);
    let dir = args.get(1).map_or_else(std::env::temp_dir, PathBuf::from);
    let jsonl = dir.join("moi-bench-import.jsonl");
    let json = dir.join("moi-bench-import.json");

    println!("peak RSS before importing: {:.1} MiB", peak_rss_mib());
    let n = generate(&jsonl, size_mib << 20, false).expect("cannot write the JSONL file");
    measure(&jsonl, n);
    let _ = std::fs::remove_file(&jsonl);
    let n = generate(&json, (size_mib / 4).max(1) << 20, true).expect("cannot write the JSON file");
    measure(&json, n);
    let _ = std::fs::remove_file(&json);
}
