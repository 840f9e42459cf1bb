//! A task's records in memory: every source imported, the eval split drawn.

use std::borrow::Cow;
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
    /// Its size and modification time just before it was read.
    #[serde(skip)]
    pub stamp: Option<FileStamp>,
}

/// A file's size and modification time, to notice it changing on disk after it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    /// Size in bytes.
    pub len: u64,
    /// Last modification, where the file system keeps it.
    pub modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    /// The stamp of `path` now, or `None` when it cannot be read.
    pub fn of(path: &std::path::Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

impl SourceOutcome {
    /// What happened to the file since it was imported, in a sentence; `None` while it is as it
    /// was (or was never read).
    pub fn drift(&self) -> Option<String> {
        let then = self.stamp?;
        let records = self.report.as_ref().map_or(0, |r| r.records);
        match FileStamp::of(&self.path) {
            None => Some(format!(
                "{} was deleted or cannot be read any more; the {records} records imported from \
                 it are kept until it is imported again",
                self.path.display()
            )),
            Some(now) if now != then => Some(format!(
                "{} changed on disk after it was imported; the studio still shows the {records} \
                 records read before",
                self.path.display()
            )),
            Some(_) => None,
        }
    }
}

/// A task's records, with the held-out split.
#[derive(Debug, Clone)]
pub struct TaskData {
    /// The task's name.
    pub name: String,
    /// Every imported record, sources in order.
    pub records: Vec<Record>,
    /// `is_eval[i]` says whether `records[i]` is held out for evaluation, as drawn for
    /// `split_key`; consumers ask [`TaskData::eval_split`], which redraws it when the task's eval
    /// share, name or the project seed changed since.
    pub is_eval: Vec<bool>,
    /// What the stored split was drawn with.
    pub split_key: SplitKey,
    /// One outcome per source, in the task's order.
    pub sources: Vec<SourceOutcome>,
}

/// What an eval split depends on: the task's eval share and name, and the project seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitKey {
    /// The task's `eval_fraction`.
    pub fraction: f64,
    /// The project seed.
    pub seed: u64,
    /// The task's name.
    pub name: String,
}

impl SplitKey {
    /// The key for a task of a project with this seed.
    pub fn of(task: &Task, seed: u64) -> Self {
        Self {
            fraction: task.eval_fraction,
            seed,
            name: task.name.clone(),
        }
    }
}

impl TaskData {
    /// The held-out split for the task's current settings: the stored one when it was drawn
    /// with them, otherwise drawn again (deterministic, so the preview, the table and the
    /// trainer always agree).
    pub fn eval_split(&self, task: &Task, seed: u64) -> Cow<'_, [bool]> {
        let key = SplitKey::of(task, seed);
        if key == self.split_key {
            Cow::Borrowed(&self.is_eval)
        } else {
            Cow::Owned(eval_mask(self.records.len(), key.fraction, seed, &key.name))
        }
    }

    /// Redraws the stored split for the task's current settings; says whether it changed.
    pub fn resplit(&mut self, task: &Task, seed: u64) -> bool {
        let key = SplitKey::of(task, seed);
        if key == self.split_key {
            return false;
        }
        self.is_eval = eval_mask(self.records.len(), key.fraction, seed, &key.name);
        self.name = task.name.clone();
        self.split_key = key;
        true
    }

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

    /// Records held out for evaluation under the task's current settings.
    pub fn eval_records_for(&self, task: &Task, seed: u64) -> Vec<&Record> {
        let split = self.eval_split(task, seed);
        self.records
            .iter()
            .zip(split.iter())
            .filter(|(_, e)| **e)
            .map(|(r, _)| r)
            .collect()
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

/// Imports every source of one task, passing each good record to `sink` as it is read, and
/// returns one outcome per source. A source that cannot be read is reported in its outcome; the
/// others are still read.
pub fn import_task_sources(
    project: &Project,
    task_index: usize,
    task: &Task,
    sink: &mut dyn FnMut(Record),
    progress: &mut dyn FnMut(LoadProgress),
) -> Vec<SourceOutcome> {
    let mut sources = Vec::with_capacity(task.sources.len());
    for (i, source) in task.sources.iter().enumerate() {
        let path = project.resolve(&source.path);
        let stamp = FileStamp::of(&path);
        let mut options = Project::import_options(source, i as u32);
        options.score_field = project
            .training
            .phases
            .difficulty
            .column()
            .map(str::to_string);
        let outcome = import_file(&path, &options, sink, &mut |bytes| {
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
                stamp,
            },
            Err(e) => SourceOutcome {
                path,
                report: None,
                error: Some(e.to_string()),
                stamp,
            },
        });
    }
    sources
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
    let sources = import_task_sources(
        project,
        task_index,
        task,
        &mut |r| records.push(r),
        progress,
    );
    let is_eval = eval_mask(records.len(), task.eval_fraction, project.seed, &task.name);
    TaskData {
        name: task.name.clone(),
        records,
        is_eval,
        split_key: SplitKey::of(task, project.seed),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::record::{Origin, Role, Turn};

    fn data(task: &Task, seed: u64, n: usize) -> TaskData {
        let records: Vec<Record> = (0..n)
            .map(|i| Record {
                system: None,
                turns: vec![
                    Turn::new(Role::User, format!("q{i}")),
                    Turn::new(Role::Assistant, format!("a{i}")),
                ],
                origin: Origin {
                    source: 0,
                    line: i as u64 + 1,
                },
                score: None,
            })
            .collect();
        TaskData {
            name: task.name.clone(),
            is_eval: eval_mask(n, task.eval_fraction, seed, &task.name),
            split_key: SplitKey::of(task, seed),
            records,
            sources: Vec::new(),
        }
    }

    #[test]
    fn the_split_follows_the_tasks_current_settings() {
        let mut task = Task::new("math", "You are a mathematician.");
        task.eval_fraction = 0.1;
        let mut d = data(&task, 7, 50);
        assert_eq!(d.eval_split(&task, 7).iter().filter(|&&e| e).count(), 5);
        // A new share, name or seed draws the split again, as loading would.
        task.eval_fraction = 0.2;
        let fresh = eval_mask(50, 0.2, 7, "math");
        assert_eq!(&*d.eval_split(&task, 7), fresh.as_slice());
        task.name = "arithmetic".into();
        assert_eq!(
            &*d.eval_split(&task, 9),
            eval_mask(50, 0.2, 9, "arithmetic").as_slice()
        );
        assert!(d.resplit(&task, 9));
        assert_eq!(d.eval_records(), 10);
        assert_eq!(d.name, "arithmetic");
        assert!(!d.resplit(&task, 9));
        assert_eq!(d.eval_records_for(&task, 9).len(), 10);
    }

    #[test]
    fn a_difficulty_column_is_read_into_each_records_score() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("graded.jsonl");
        std::fs::write(
            &file,
            concat!(
                "{\"instruction\": \"a\", \"output\": \"x\", \"level\": 3}\n",
                "{\"instruction\": \"b\", \"output\": \"y\", \"level\": \"1.5\"}\n",
                "{\"instruction\": \"c\", \"output\": \"z\"}\n",
            ),
        )
        .unwrap();
        let mut project = Project {
            base_dir: dir.path().to_path_buf(),
            ..Project::default()
        };
        let mut task = Task::new("graded", "You are graded.");
        task.sources
            .push(crate::core::project::Source::new("graded.jsonl"));
        project.tasks.push(task.clone());
        let scores = |p: &Project| -> Vec<Option<f64>> {
            load_task(p, 0, &task, &mut |_| {})
                .records
                .iter()
                .map(|r| r.score)
                .collect()
        };
        assert_eq!(scores(&project), vec![None, None, None], "not asked for");
        project.training.phases.difficulty =
            crate::core::phases::Difficulty::Column("level".into());
        assert_eq!(scores(&project), vec![Some(3.0), Some(1.5), None]);
    }
}
