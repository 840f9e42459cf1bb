//! A task's records in memory: every source imported, the eval split drawn.

use std::path::PathBuf;

use serde::Serialize;

use crate::core::import::{ImportProgress, ImportReport, import_file};
use crate::core::project::{Project, Task};
use crate::core::record::Record;
use crate::core::split::eval_mask;

/// The outcome of importing one source of a task.
#[derive(Debug, Clone, Serialize)]
pub struct SourceOutcome {
    /// The file as found on disk.
    pub path: PathBuf,
    /// The import report, when the file could be read at all.
    pub report: Option<ImportReport>,
    /// Why the file could not be read, when it could not.
    pub error: Option<String>,
}

/// A task's records, with the held-out split.
#[derive(Debug, Clone)]
pub struct TaskData {
    /// The task's name.
    pub name: String,
    /// Every imported record, sources in order.
    pub records: Vec<Record>,
    /// `is_eval[i]` says whether `records[i]` is held out for evaluation.
    pub is_eval: Vec<bool>,
    /// One outcome per source, in the task's order.
    pub sources: Vec<SourceOutcome>,
}

impl TaskData {
    /// Records rejected across all sources.
    pub fn rejected(&self) -> u64 {
        self.sources
            .iter()
            .filter_map(|s| s.report.as_ref())
            .map(|r| r.rejected)
            .sum()
    }

    /// Number of records held out for evaluation.
    pub fn eval_records(&self) -> usize {
        self.is_eval.iter().filter(|&&e| e).count()
    }

    /// Records used for training.
    pub fn train_records(&self) -> impl Iterator<Item = &Record> {
        self.records
            .iter()
            .zip(&self.is_eval)
            .filter(|(_, e)| !**e)
            .map(|(r, _)| r)
    }

    /// Records held out for evaluation.
    pub fn eval_records_iter(&self) -> impl Iterator<Item = &Record> {
        self.records
            .iter()
            .zip(&self.is_eval)
            .filter(|(_, e)| **e)
            .map(|(r, _)| r)
    }

    /// Sources that could not be read at all.
    pub fn failed_sources(&self) -> usize {
        self.sources.iter().filter(|s| s.error.is_some()).count()
    }
}

/// Progress of loading a project: which task and source, and bytes within that source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProgress {
    /// Index of the task being loaded.
    pub task: usize,
    /// Index of the source within the task.
    pub source: usize,
    /// Bytes of that source read so far, and its size.
    pub bytes: ImportProgress,
}

/// Imports every source of one task and draws its eval split. A source that cannot be read is
/// reported in its outcome; the task keeps the records of the others.
pub fn load_task(
    project: &Project,
    task_index: usize,
    task: &Task,
    progress: &mut dyn FnMut(LoadProgress),
) -> TaskData {
    let mut records = Vec::new();
    let mut sources = Vec::with_capacity(task.sources.len());
    for (i, source) in task.sources.iter().enumerate() {
        let path = project.resolve(&source.path);
        let options = Project::import_options(source, i as u32);
        let outcome = import_file(&path, &options, &mut |r| records.push(r), &mut |bytes| {
            progress(LoadProgress {
                task: task_index,
                source: i,
                bytes,
            })
        });
        sources.push(match outcome {
            Ok(report) => SourceOutcome {
                path,
                report: Some(report),
                error: None,
            },
            Err(e) => SourceOutcome {
                path,
                report: None,
                error: Some(e.to_string()),
            },
        });
    }
    let is_eval = eval_mask(records.len(), task.eval_fraction, project.seed, &task.name);
    TaskData {
        name: task.name.clone(),
        records,
        is_eval,
        sources,
    }
}

/// Imports every task of a project, in order.
pub fn load_project(project: &Project, progress: &mut dyn FnMut(LoadProgress)) -> Vec<TaskData> {
    project
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| load_task(project, i, t, progress))
        .collect()
}
