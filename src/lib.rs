//! MoI Studio: curate multi-task instruction data and fine-tune a language model on it with
//! Mixture-of-Instructions.

pub mod cli;
pub mod core;
#[doc(hidden)]
pub mod fuzzing;
pub mod train;
pub mod ui;

use std::path::PathBuf;

/// The demo project shipped with the source tree, if it can be found: next to the working
/// directory first, then in the source folder the binary was built from.
pub fn demo_project_path() -> Option<PathBuf> {
    let candidates = [
        PathBuf::from("presets/demo.moi.toml"),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets/demo.moi.toml"),
    ];
    candidates.into_iter().find(|p| p.is_file())
}
