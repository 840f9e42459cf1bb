//! A run's history as the plots need it — training loss, learning rate, throughput and every
//! evaluation — built from the worker's events as they arrive, or reloaded from a past run's
//! `metrics.jsonl`. Also the list of past runs in a `runs/` folder.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use crate::core::events::{EvalMetrics, PromptKind, TrainEvent};
use crate::core::metrics::Series;

/// One task's eval curves: loss and exact match, under each prompt kind.
#[derive(Debug, Clone, Default)]
pub struct TaskCurves {
    /// Eval loss under the task's own prompt.
    pub loss_task: Series,
    /// Eval loss under the default prompt.
    pub loss_default: Series,
    /// Exact match under the task's own prompt.
    pub exact_task: Series,
    /// Exact match under the default prompt.
    pub exact_default: Series,
    /// Chained instructions with every step done, under the task's own prompt.
    pub steps_task: Series,
    /// Chained instructions with every step done, under the default prompt.
    pub steps_default: Series,
}

/// Everything a run has reported, ready to plot.
#[derive(Debug, Clone, Default)]
pub struct RunHistory {
    /// Training loss per step.
    pub loss: Series,
    /// Each task's training loss per step (the mean over its tokens in the step).
    pub task_loss: BTreeMap<String, Series>,
    /// Learning rate per step.
    pub lr: Series,
    /// Tokens per second per step.
    pub tokens_per_sec: Series,
    /// Eval curves by task name.
    pub tasks: BTreeMap<String, TaskCurves>,
    /// The latest evaluation of each task and prompt kind.
    pub latest_eval: Vec<EvalMetrics>,
    /// Steps the run planned, from its `started` event.
    pub total_steps: Option<u64>,
    /// The last step reported.
    pub step: u64,
    /// The epoch at the last step (fractional).
    pub epoch: f64,
    /// Seconds since the start, at the last step.
    pub elapsed_s: f64,
    /// The device it ran on.
    pub device: Option<String>,
    /// How it ended (finished, stopped, failed), once it has.
    pub ending: Option<TrainEvent>,
    /// Log lines, oldest first (the last 200).
    pub log: Vec<String>,
    /// A phased run's phases: (phase from 1, the step it began after), in order.
    pub phase_starts: Vec<(u32, u64)>,
    /// A phased run's difficulty scores and cut points.
    pub difficulty: Option<crate::core::phases::DifficultyReport>,
}

impl RunHistory {
    /// Takes in one event.
    pub fn absorb(&mut self, event: &TrainEvent) {
        match event {
            TrainEvent::Started {
                device,
                total_steps,
                ..
            } => {
                self.device = Some(device.clone());
                self.total_steps = Some(*total_steps);
            }
            TrainEvent::Step(m) => {
                let x = m.step as f64;
                self.loss.push(x, m.loss);
                for t in &m.task_loss {
                    self.task_loss
                        .entry(t.task.clone())
                        .or_default()
                        .push(x, t.loss);
                }
                self.lr.push(x, m.lr);
                self.tokens_per_sec.push(x, m.tokens_per_sec);
                self.step = m.step;
                self.epoch = m.epoch;
                self.elapsed_s = m.elapsed_s;
            }
            TrainEvent::Eval(e) => {
                let curves = self.tasks.entry(e.task.clone()).or_default();
                let x = e.step as f64;
                let (loss, exact) = match e.prompt {
                    PromptKind::Task => (&mut curves.loss_task, &mut curves.exact_task),
                    PromptKind::Default => (&mut curves.loss_default, &mut curves.exact_default),
                };
                loss.push(x, e.loss);
                if let Some(em) = e.exact_match {
                    exact.push(x, em);
                }
                if let Some(done) = e.steps_done {
                    match e.prompt {
                        PromptKind::Task => curves.steps_task.push(x, done),
                        PromptKind::Default => curves.steps_default.push(x, done),
                    }
                }
                self.latest_eval
                    .retain(|m| !(m.task == e.task && m.prompt == e.prompt));
                self.latest_eval.push(e.clone());
            }
            TrainEvent::Log { message } => {
                self.log.push(message.clone());
                if self.log.len() > 200 {
                    self.log.remove(0);
                }
            }
            TrainEvent::Difficulty(d) => self.difficulty = Some(d.clone()),
            TrainEvent::PhaseStarted { phase, step, .. } => {
                // A resumed run may announce a phase again.
                self.phase_starts.retain(|(p, _)| p < phase);
                self.phase_starts.push((*phase, *step));
            }
            TrainEvent::Checkpoint { .. }
            | TrainEvent::Generated { .. }
            | TrainEvent::PhaseEnded { .. } => {}
            TrainEvent::Finished { .. }
            | TrainEvent::Stopped { .. }
            | TrainEvent::Failed { .. } => {
                self.ending = Some(event.clone());
            }
        }
    }

    /// Seconds left at the current pace, once there is a pace.
    pub fn eta_s(&self) -> Option<f64> {
        let total = self.total_steps?;
        (self.step > 0 && total > self.step)
            .then(|| self.elapsed_s / self.step as f64 * (total - self.step) as f64)
    }

    /// Reloads a run from its `metrics.jsonl`. Lines that do not parse (a run killed mid-write)
    /// are skipped and counted.
    pub fn load(run_dir: &Path) -> std::io::Result<(Self, usize)> {
        let file = std::fs::File::open(run_dir.join("metrics.jsonl"))?;
        let mut history = Self::default();
        let mut bad = 0;
        for line in std::io::BufReader::new(file).lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<TrainEvent>(&line) {
                Ok(event) => history.absorb(&event),
                Err(_) => bad += 1,
            }
        }
        Ok((history, bad))
    }
}

/// A past run, as listed in the Runs view.
#[derive(Debug, Clone)]
pub struct RunEntry {
    /// Its folder.
    pub dir: PathBuf,
    /// The folder name (time and a random part).
    pub id: String,
    /// `summary.json`, when the run wrote one (it does when it ends).
    pub summary: Option<serde_json::Value>,
    /// `run.json`, written when it starts (the model and whether it is LoRA).
    pub info: Option<serde_json::Value>,
    /// Whether it has a finished `model/` folder to export (read when listed, not per frame).
    pub has_model: bool,
    /// Whether it did not finish (stopped, failed, or cut off) and has a checkpoint to go on
    /// from (its checksums are checked when it resumes).
    pub resumable: bool,
    /// Why it failed, when its last recorded event is a failure and it wrote no summary (a
    /// trainer process that died, a NaN, a full disk).
    pub failure: Option<String>,
}

/// Cuts a run's `metrics.jsonl` back to what it held when the checkpoint of `step` was written:
/// every line up to the first event of a later step, or up to a line cut short by a kill, is
/// kept; the rest is dropped, atomically. Returns how many lines were dropped.
pub fn cut_metrics(path: &Path, step: u64) -> std::io::Result<usize> {
    let text = std::fs::read_to_string(path)?;
    let mut kept = String::with_capacity(text.len());
    let mut lines = text.split_inclusive('\n');
    for line in lines.by_ref() {
        let whole = line.ends_with('\n');
        let later = match serde_json::from_str::<serde_json::Value>(line.trim_end()) {
            Ok(event) => event
                .get("step")
                .and_then(serde_json::Value::as_u64)
                .is_some_and(|s| s > step),
            Err(_) => !line.trim().is_empty(),
        };
        if later || !whole {
            let dropped = 1 + lines.count();
            crate::core::fsutil::write_atomic(path, kept.as_bytes())?;
            return Ok(dropped);
        }
        kept.push_str(line);
    }
    Ok(0)
}

/// The error of a `metrics.jsonl` whose last event is a failure (only its end is read).
fn last_failure(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))
        .ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let last = text.lines().rev().find(|l| !l.trim().is_empty())?;
    match serde_json::from_str::<crate::core::events::TrainEvent>(last).ok()? {
        crate::core::events::TrainEvent::Failed { error } => Some(error),
        _ => None,
    }
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
}

/// The run folders in `runs_dir`, newest first.
pub fn list_runs(runs_dir: &Path) -> Vec<RunEntry> {
    let Ok(entries) = std::fs::read_dir(runs_dir) else {
        return Vec::new();
    };
    let mut runs: Vec<RunEntry> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("metrics.jsonl").is_file())
        .map(|dir| RunEntry {
            id: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            summary: read_json(&dir.join("summary.json")),
            info: read_json(&dir.join("run.json")),
            has_model: dir.join("model").is_dir(),
            resumable: false,
            failure: None,
            dir,
        })
        .collect();
    for run in &mut runs {
        let finished = run
            .summary
            .as_ref()
            .and_then(|s| s.get("ending"))
            .and_then(serde_json::Value::as_str)
            == Some("finished");
        run.resumable = !finished && has_checkpoint(&run.dir);
        if run.summary.is_none() {
            run.failure = last_failure(&run.dir.join("metrics.jsonl"));
        }
    }
    runs.sort_by(|a, b| b.id.cmp(&a.id));
    runs
}

/// Whether `dir` holds a `checkpoint-N` folder.
fn has_checkpoint(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("checkpoint-"))
                .is_some_and(|n| n.parse::<u64>().is_ok())
                && e.path().is_dir()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::events::StepMetrics;

    fn step(n: u64, loss: f64) -> TrainEvent {
        TrainEvent::Step(StepMetrics {
            step: n,
            epoch: 0.0,
            loss,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens_per_sec: 1000.0,
            elapsed_s: n as f64,
            tokens_seen: n * 1000,
            steps: 1,
            task_loss: Vec::new(),
        })
    }

    fn eval(n: u64, prompt: PromptKind, loss: f64) -> TrainEvent {
        TrainEvent::Eval(EvalMetrics {
            step: n,
            task: "math".into(),
            prompt,
            loss,
            perplexity: loss.exp(),
            accuracy: 0.5,
            exact_match: Some(0.25),
            items: 4,
            generated: 4,
            sample: None,
            steps_done: None,
            steps_tried: 0,
            tokens: 100,
        })
    }

    #[test]
    fn a_past_run_reloads_with_its_curves_and_ending() {
        let dir = tempfile::tempdir().unwrap();
        let events = [
            TrainEvent::Started {
                device: "cpu".into(),
                device_reason: "test".into(),
                parameters: 10,
                trainable: 10,
                total_steps: 10,
                kernels: "fused CPU kernels".into(),
            },
            step(1, 3.0),
            step(2, 2.5),
            eval(2, PromptKind::Task, 2.0),
            eval(2, PromptKind::Default, 2.2),
            step(3, 2.0),
            eval(3, PromptKind::Default, 2.1),
            TrainEvent::Stopped { step: 3 },
        ];
        let mut text: String = events
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect();
        text.push_str("{\"event\":\"step\",\"ste"); // cut off mid-write
        std::fs::write(dir.path().join("metrics.jsonl"), text).unwrap();
        let (h, bad) = RunHistory::load(dir.path()).unwrap();
        assert_eq!(bad, 1);
        assert_eq!(h.loss.points(), vec![[1.0, 3.0], [2.0, 2.5], [3.0, 2.0]]);
        let math = &h.tasks["math"];
        assert_eq!(math.loss_task.points(), vec![[2.0, 2.0]]);
        assert_eq!(math.loss_default.points(), vec![[2.0, 2.2], [3.0, 2.1]]);
        assert_eq!(math.exact_default.len(), 2);
        // The latest eval per task and prompt kind.
        assert_eq!(h.latest_eval.len(), 2);
        assert!(
            h.latest_eval
                .iter()
                .any(|m| m.step == 3 && m.prompt == PromptKind::Default)
        );
        assert_eq!(h.ending, Some(TrainEvent::Stopped { step: 3 }));
        assert_eq!(h.eta_s(), Some(7.0));
        let runs = list_runs(dir.path().parent().unwrap());
        assert!(runs.iter().any(|r| r.dir == dir.path()));
    }

    #[test]
    fn metrics_are_cut_back_to_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let lines = [
            r#"{"event":"started","total_steps":9}"#,
            r#"{"event":"step","step":1,"loss":2.0}"#,
            r#"{"event":"step","step":2,"loss":1.5}"#,
            r#"{"event":"checkpoint","step":2,"path":"c"}"#,
            r#"{"event":"log","message":"after the checkpoint"}"#,
            r#"{"event":"step","step":3,"loss":1.2}"#,
            r#"{"event":"log","message":"later"}"#,
        ];
        let text = lines.join("\n") + "\n";
        std::fs::write(&path, &text).unwrap();
        assert_eq!(cut_metrics(&path, 2).unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            lines[..5].join("\n") + "\n"
        );
        // Nothing after the step: nothing to cut.
        assert_eq!(cut_metrics(&path, 2).unwrap(), 0);
        // A line cut short by a kill goes, with everything after it.
        std::fs::write(
            &path,
            format!("{}\n{}\n{{\"event\":\"st", lines[0], lines[1]),
        )
        .unwrap();
        assert_eq!(cut_metrics(&path, 5).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n{}\n", lines[0], lines[1])
        );
    }
}
