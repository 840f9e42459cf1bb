//! What several integration tests share: the source root, and real material fetched by the
//! project's own script when missing.

use std::path::PathBuf;
use std::process::Command;

/// The source tree's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `relative` under the root, fetched or built by `scripts/fetch_models.sh` when it is not there.
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
