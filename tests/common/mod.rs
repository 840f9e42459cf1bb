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
