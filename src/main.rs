use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: tokenizing a million records makes many small, long-lived
/// allocations, and glibc's bins spent over half of `moi-studio pack`'s time (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use moi_studio::cli::{Cli, command_summary, run};
use moi_studio::ui::{no_display_reason, run_studio};

fn main() -> ExitCode {
    moi_studio::train::memory::tune_allocator();
    let cli = Cli::parse();
    let code = match cli.command {
        Some(command) => match run(command) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        },
        None => open_studio(cli.project),
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// Opens the studio, or explains why it cannot and what the CLI offers instead.
fn open_studio(project: Option<std::path::PathBuf>) -> i32 {
    let demo = moi_studio::demo_project_path();
    let Some(fallback) = demo.or_else(|| project.clone()) else {
        eprintln!(
            "error: no project given and the demo project (presets/demo.moi.toml) is not here"
        );
        return 2;
    };
    if let Some(why) = no_display_reason() {
        eprintln!(
            "{why}.\nUse the command line instead:\n{}",
            command_summary()
        );
        return 2;
    }
    match run_studio(project, fallback) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!(
                "error: {e:#}\nThe command line works without a window:\n{}",
                command_summary()
            );
            1
        }
    }
}
