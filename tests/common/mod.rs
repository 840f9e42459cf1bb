//! What several integration tests share: the source root, real material fetched by the
//! project's own script when missing, and a quick copy of the benchmark project.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The source tree's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `relative` under the root, fetched or built by `scripts/fetch_models.sh` when it is not there.
#[allow(dead_code)]
pub fn fetched(relative: &str) -> PathBuf {
    let path = root().join(relative);
    if !path.is_file() {
        let status = Command::new("bash")
            .arg(root().join("scripts/fetch_models.sh"))
            .current_dir(root())
            .status()
            .expect("running scripts/fetch_models.sh");
        assert!(status.success(), "scripts/fetch_models.sh failed");
    }
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// The benchmark project made quick: 128-token rows, one row a step, few held-out items, short
/// answers; its sources still point at the shipped data.
#[allow(dead_code)]
pub fn quick_benchmarks() -> moi_studio::core::project::Project {
    let mut project =
        moi_studio::core::project::Project::load(&root().join("presets/benchmarks.moi.toml"))
            .unwrap();
    project.packing.max_seq_len = 128;
    project.training.batch_rows = 1;
    project.training.eval_items = 3;
    project.training.eval_generate = 1;
    for task in &mut project.tasks {
        task.max_new_tokens = 4;
    }
    project
}

/// [`quick_benchmarks`] changed by `edit` and saved into `dir` as `quick.moi.toml`.
#[allow(dead_code)]
pub fn quick_project(
    dir: &Path,
    edit: impl FnOnce(&mut moi_studio::core::project::Project),
) -> PathBuf {
    let mut project = quick_benchmarks();
    edit(&mut project);
    let path = dir.join("quick.moi.toml");
    project.save(&path).unwrap();
    path
}

/// A parquet file in memory: one flat alpaca table (a null answer in row 2) or one nested
/// sharegpt table (lists of structs).
#[allow(dead_code)]
pub fn parquet_bytes(sharegpt: bool) -> Vec<u8> {
    use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Fields};
    use std::sync::Arc;

    let batch = if sharegpt {
        let fields = Fields::from(vec![
            Field::new("from", DataType::Utf8, true),
            Field::new("value", DataType::Utf8, true),
        ]);
        let mut list = ListBuilder::new(StructBuilder::from_fields(fields, 4));
        for i in 0..5 {
            let s = list.values();
            for (from, value) in [("human", format!("hello {i}")), ("gpt", format!("hi {i}"))] {
                s.field_builder::<StringBuilder>(0)
                    .unwrap()
                    .append_value(from);
                s.field_builder::<StringBuilder>(1)
                    .unwrap()
                    .append_value(value);
                s.append(true);
            }
            list.append(true);
        }
        let array: ArrayRef = Arc::new(list.finish());
        RecordBatch::try_from_iter([("conversations", array)]).unwrap()
    } else {
        let q: ArrayRef = Arc::new(StringArray::from(vec!["a?", "b?", "c?"]));
        let a: ArrayRef = Arc::new(StringArray::from(vec![Some("A"), None, Some("C")]));
        RecordBatch::try_from_iter([("instruction", q), ("output", a)]).unwrap()
    };
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}
