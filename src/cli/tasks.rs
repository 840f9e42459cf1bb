//! `moi-studio tasks PROJECT`: list a project's tasks with record and rejection counts.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::core::dataset::load_task;
use crate::core::project::Project;

/// Arguments of `tasks`.
#[derive(Debug, Args)]
pub struct TasksArgs {
    /// The project file.
    pub project: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `tasks`: exit code 0 when the project opens, 1 when it does not.
pub fn run(args: TasksArgs) -> anyhow::Result<i32> {
    let project = match Project::load(&args.project) {
        Ok(p) => p,
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    json!({ "project": args.project, "error": e.to_string() })
                );
            } else {
                eprintln!("error: {e}");
            }
            return Ok(1);
        }
    };
    let mut rows = Vec::new();
    for (i, task) in project.tasks.iter().enumerate() {
        let total: u64 = task
            .sources
            .iter()
            .filter_map(|s| std::fs::metadata(project.resolve(&s.path)).ok())
            .map(|m| m.len())
            .sum();
        let bar = (!args.json).then(|| super::byte_bar(total, format!("reading {}", task.name)));
        let mut finished_sources = 0u64;
        let mut last_source = 0usize;
        let data = load_task(&project, i, task, &mut |p| {
            if p.source != last_source {
                finished_sources += p.bytes.bytes_total;
                last_source = p.source;
            }
            if let Some(bar) = &bar {
                bar.set_position(finished_sources + p.bytes.bytes_done);
            }
        });
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        rows.push((task, data));
    }

    if args.json {
        let tasks: Vec<_> = rows
            .iter()
            .map(|(task, data)| {
                json!({
                    "name": task.name,
                    "records": data.records.len(),
                    "rejected": data.rejected(),
                    "eval_records": data.eval_records(),
                    "system_prompt": task.system_prompt,
                    "system_rule": task.system_rule,
                    "weight": task.weight,
                    "eval_fraction": task.eval_fraction,
                    "sources": data.sources.iter().map(|s| json!({
                        "path": s.path,
                        "format": s.report.as_ref().map(|r| r.format.clone()),
                        "records": s.report.as_ref().map_or(0, |r| r.records),
                        "rejected": s.report.as_ref().map_or(0, |r| r.rejected),
                        "stopped_early": s.report.as_ref().and_then(|r| r.stopped_early.clone()),
                        "error": s.error,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let out = json!({
            "project": args.project,
            "name": project.name,
            "default_system_prompt": project.default_system_prompt,
            "tasks": tasks,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).context("writing JSON")?
        );
        return Ok(0);
    }

    println!(
        "{} — default system prompt: \"{}\"",
        args.project.display(),
        project.default_system_prompt
    );
    println!(
        "{:<16} {:>8} {:>9} {:>6}  {:<24} system prompt",
        "task", "records", "rejected", "eval", "sources"
    );
    for (task, data) in &rows {
        let formats: Vec<String> = data
            .sources
            .iter()
            .map(|s| match (&s.report, &s.error) {
                (Some(r), _) => r.format.clone(),
                (None, _) => "unreadable".to_string(),
            })
            .collect();
        println!(
            "{:<16} {:>8} {:>9} {:>6}  {:<24} {}",
            task.name,
            data.records.len(),
            data.rejected(),
            data.eval_records(),
            format!("{} ({})", data.sources.len(), formats.join(", ")),
            one_line(&task.system_prompt, 60)
        );
        for s in &data.sources {
            if let Some(e) = &s.error {
                println!("  ! {e}");
            }
            if let Some(why) = s.report.as_ref().and_then(|r| r.stopped_early.as_ref()) {
                println!("  ! {}: stopped early: {why}", s.path.display());
            }
        }
    }
    if project.tasks.is_empty() {
        println!("(no tasks yet)");
    }
    Ok(0)
}

/// The first line of `text`, cut to `max` characters with an ellipsis.
fn one_line(text: &str, max: usize) -> String {
    let first = text.lines().next().unwrap_or("");
    if first.chars().count() > max || text.lines().count() > 1 {
        let cut: String = first.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        first.to_string()
    }
}
