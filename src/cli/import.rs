//! `moi-studio import FILE`: read a dataset file and report on it.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::core::import::{ColumnMapping, Format, ImportOptions, import_file};

/// Arguments of `import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The dataset file (.jsonl, .json, .csv, .tsv, .parquet, or .gz of the text ones).
    pub file: PathBuf,
    /// The dataset format (alpaca, sharegpt, openai, prompt_completion); detected when absent.
    #[arg(long)]
    pub format: Option<Format>,
    /// Point a field at a role, e.g. --map user=question --map assistant=solution.
    /// Roles: system, user, input, assistant, messages.
    #[arg(long = "map", value_name = "ROLE=FIELD")]
    pub map: Vec<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `import`: exit code 0 when at least one record was imported, 1 otherwise.
pub fn run(args: ImportArgs) -> anyhow::Result<i32> {
    let mapping = ColumnMapping::parse_pairs(&args.map).map_err(anyhow::Error::msg)?;
    let options = ImportOptions {
        format: args.format,
        mapping,
        ..ImportOptions::default()
    };
    let size = std::fs::metadata(&args.file).map(|m| m.len()).unwrap_or(0);
    let bar = (!args.json).then(|| super::byte_bar(size, "importing".to_string()));
    let result = import_file(&args.file, &options, &mut |_| {}, &mut |p| {
        if let Some(bar) = &bar {
            bar.set_position(p.bytes_done);
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{report}");
            }
            Ok(if report.records > 0 { 0 } else { 1 })
        }
        Err(e) => {
            if args.json {
                let out = json!({
                    "file": args.file,
                    "format": null,
                    "records": 0,
                    "rejected": 0,
                    "rejections": [],
                    "error": e.to_string(),
                });
                println!("{out}");
            } else {
                eprintln!("error: {e}");
            }
            Ok(1)
        }
    }
}
