//! `moi-studio synth --out DIR`: writes the seeded synthetic MoI suite and a project for it.

use std::path::PathBuf;

use clap::Args;

use crate::core::synth::{SynthTask, write_suite};

/// Arguments of `synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Folder to write the task files and `synth.moi.toml` into.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed: the same seed writes the same files.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Records of the largest task (general); math and code get half as many, tool use a
    /// quarter.
    #[arg(long, default_value_t = 2400)]
    pub records: usize,
}

/// Runs `synth`.
pub fn run(args: SynthArgs) -> anyhow::Result<i32> {
    if args.records == 0 {
        anyhow::bail!("--records must be at least 1");
    }
    let project = write_suite(&args.out, args.seed, args.records)
        .map_err(|e| anyhow::anyhow!("writing the suite failed: {e} ({})", args.out.display()))?;
    for task in SynthTask::ALL {
        println!(
            "{:<9} {} records, checked by \"{}\", system prompt \"{}\" → {}",
            task.name(),
            task.records_in(args.records),
            task.check().label(),
            task.system_prompt(),
            args.out.join(task.file_name()).display()
        );
    }
    println!(
        "project: {}  (open it with: moi-studio {})",
        project.display(),
        project.display()
    );
    Ok(0)
}
