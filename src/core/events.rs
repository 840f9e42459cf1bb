//! The training worker's protocol: commands to it, events from it, and the sender that never
//! drops a step (when the channel is full, steps are merged into one aggregate that goes out with
//! the next send).

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use serde::{Deserialize, Serialize};

/// What the UI or CLI can ask of a running worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainCommand {
    /// Hold after the current step.
    Pause,
    /// Carry on after a pause.
    Resume,
    /// Save a checkpoint and stop.
    Stop,
    /// Evaluate at the next step boundary.
    EvalNow,
    /// Write a checkpoint at the next step boundary.
    SaveCheckpoint,
    /// Answer a prompt with the current weights (greedy) at the next step boundary.
    Generate {
        /// The system prompt.
        system: String,
        /// The user's prompt.
        prompt: String,
        /// Longest answer.
        max_new_tokens: usize,
    },
}

/// The worker's listener has gone away (the window closed or the CLI quit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the listener of the training events is gone")]
pub struct ListenerGone;

/// One task's share of a step: the mean loss of the trained tokens of its samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskLoss {
    /// The task's name.
    pub task: String,
    /// Mean next-token loss over the task's trained tokens in the step(s).
    pub loss: f64,
    /// How many trained tokens that mean is over.
    pub tokens: u64,
}

/// One optimizer step's numbers (or several merged, see `steps`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The (last) step number, from 1.
    pub step: u64,
    /// Epoch, fractional.
    pub epoch: f64,
    /// Training loss (mean over the merged steps).
    pub loss: f64,
    /// Learning rate at the last step.
    pub lr: f64,
    /// Global gradient norm before clipping (mean over the merged steps).
    pub grad_norm: f64,
    /// Training throughput.
    pub tokens_per_sec: f64,
    /// Seconds since the run started.
    pub elapsed_s: f64,
    /// Non-padding tokens trained on since the run started, up to this step.
    #[serde(default)]
    pub tokens_seen: u64,
    /// How many steps these numbers stand for (1 unless merged).
    pub steps: u32,
    /// Each task's mean token loss in the step, for tasks that had trained tokens in it. With
    /// token-mean loss, these weighted by `tokens` average to `loss`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub task_loss: Vec<TaskLoss>,
}

impl StepMetrics {
    /// Merges a later step into this one: means weighted by steps, latest step/lr/time kept.
    pub fn absorb(&mut self, later: &StepMetrics) {
        let (a, b) = (f64::from(self.steps), f64::from(later.steps));
        let w = |x: f64, y: f64| (x * a + y * b) / (a + b);
        self.loss = w(self.loss, later.loss);
        self.grad_norm = w(self.grad_norm, later.grad_norm);
        self.tokens_per_sec = w(self.tokens_per_sec, later.tokens_per_sec);
        self.step = later.step;
        self.epoch = later.epoch;
        self.lr = later.lr;
        self.elapsed_s = later.elapsed_s;
        self.tokens_seen = later.tokens_seen;
        self.steps += later.steps;
        for t in &later.task_loss {
            match self.task_loss.iter_mut().find(|m| m.task == t.task) {
                Some(m) => {
                    let n = m.tokens + t.tokens;
                    if n > 0 {
                        m.loss = (m.loss * m.tokens as f64 + t.loss * t.tokens as f64) / n as f64;
                    }
                    m.tokens = n;
                }
                None => self.task_loss.push(t.clone()),
            }
        }
    }
}

/// Which system prompt an evaluation ran under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptKind {
    /// The task's own system prompt.
    Task,
    /// The project's default system prompt.
    Default,
}

impl PromptKind {
    /// "task" or "default".
    pub fn label(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Default => "default",
        }
    }
}

/// One task's evaluation under one prompt kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Step evaluated at.
    pub step: u64,
    /// The task.
    pub task: String,
    /// Under which prompt.
    pub prompt: PromptKind,
    /// Mean loss on answer tokens.
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Share of answer tokens predicted exactly (greedy).
    pub accuracy: f64,
    /// Share of generated answers that pass the task's check, when it has one.
    pub exact_match: Option<f64>,
    /// Held-out records scored.
    pub items: usize,
    /// Records answered by generation for the exact-match check.
    pub generated: usize,
    /// Answer tokens scored.
    pub tokens: u64,
    /// The first generated answer, to show what the model says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<String>,
    /// Share of held-out records asked as chained instructions whose answer did every step
    /// (tasks with step templates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_done: Option<f64>,
    /// Chained items answered for `steps_done`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub steps_tried: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Everything a worker reports, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    /// The run began.
    Started {
        /// "cpu" or "cuda:0".
        device: String,
        /// Why that device.
        device_reason: String,
        /// All parameters.
        parameters: u64,
        /// Parameters being trained.
        trainable: u64,
        /// Steps planned.
        total_steps: u64,
        /// Which kernels run (fused or composite, and why).
        #[serde(default)]
        kernels: String,
    },
    /// A step (or merged steps) finished.
    Step(StepMetrics),
    /// An evaluation finished.
    Eval(EvalMetrics),
    /// A checkpoint was written.
    Checkpoint {
        /// At which step.
        step: u64,
        /// Where.
        path: String,
    },
    /// The answer to a [`TrainCommand::Generate`].
    Generated {
        /// The step whose weights answered.
        step: u64,
        /// The prompt.
        prompt: String,
        /// The answer (or why there is none).
        text: String,
    },
    /// A line for the log.
    Log {
        /// The text.
        message: String,
    },
    /// How a phased run scored its records and cut them into phases (before the first step).
    Difficulty(crate::core::phases::DifficultyReport),
    /// A phase of a phased run began.
    PhaseStarted {
        /// Which, from 1.
        phase: u32,
        /// Phases in the run.
        phases: u32,
        /// Steps done before it.
        step: u64,
        /// Non-padding tokens trained on before it.
        tokens: u64,
        /// Training records in it.
        records: u64,
    },
    /// A phase of a phased run ended.
    PhaseEnded {
        /// Which, from 1.
        phase: u32,
        /// Its last step.
        step: u64,
        /// Non-padding tokens trained on by then.
        tokens: u64,
    },
    /// The run reached its end.
    Finished {
        /// Last step.
        step: u64,
    },
    /// The run was stopped on request.
    Stopped {
        /// Last step.
        step: u64,
    },
    /// The run failed.
    Failed {
        /// Why, in a sentence.
        error: String,
    },
}

impl TrainEvent {
    /// Whether this event ends the run.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            TrainEvent::Finished { .. } | TrainEvent::Stopped { .. } | TrainEvent::Failed { .. }
        )
    }
}

/// A callback that asks the UI to repaint.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// `wake`, passed on at most once per `gap`; calls in between are dropped. For a stream of
/// events (a step every few milliseconds) whose listener also repaints on a timer while the
/// stream lasts, so nothing waits longer than that timer: every step event repainting the
/// window cost half a core under software rendering, taken from the training it showed.
pub fn rate_limited(wake: Wake, gap: std::time::Duration) -> Wake {
    let last: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    Arc::new(move || {
        let now = std::time::Instant::now();
        let pass = match last.lock() {
            Ok(mut last) => {
                let due = last.is_none_or(|t| now.duration_since(t) >= gap);
                if due {
                    *last = Some(now);
                }
                due
            }
            Err(_) => true,
        };
        if pass {
            wake();
        }
    })
}

/// The worker's side of the event channel. Lifecycle events are sent blocking; steps are tried
/// and, when the channel is full, merged into a pending aggregate sent before anything else.
pub struct EventSender {
    tx: Sender<TrainEvent>,
    pending: Option<StepMetrics>,
    wake: Wake,
    /// Where every event is also written, one JSON line each, before any merging.
    log: Option<Box<dyn std::io::Write + Send>>,
}

/// A bounded event channel: the worker's sender and the listener's receiver.
pub fn event_channel(capacity: usize, wake: Wake) -> (EventSender, Receiver<TrainEvent>) {
    let (tx, rx) = bounded(capacity.max(1));
    (
        EventSender {
            tx,
            pending: None,
            wake,
            log: None,
        },
        rx,
    )
}

impl EventSender {
    /// Also writes every event (every single step) as a JSON line to `log`.
    pub fn record_to(&mut self, log: Box<dyn std::io::Write + Send>) {
        self.log = Some(log);
    }

    fn record(&mut self, event: &TrainEvent) {
        if let Some(log) = self.log.as_mut() {
            // A failing log must not stop training; the channel still carries the event.
            if serde_json::to_writer(&mut *log, event).is_ok() {
                let _ = log.write_all(b"\n");
                // Every line reaches the file at once: a run killed right after a checkpoint
                // must not lose the steps before it (resuming cuts the file back to them).
                let _ = log.flush();
            }
        }
    }

    /// Reports a step without blocking; nothing is dropped.
    pub fn step(&mut self, metrics: StepMetrics) {
        self.record(&TrainEvent::Step(metrics.clone()));
        self.forward_step(metrics);
    }

    /// Passes on an event that is already in the record (the history a resumed run continues
    /// from) to the listener only, so it can draw the curves from the first step.
    pub fn replay(&mut self, event: TrainEvent) -> Result<(), ListenerGone> {
        match event {
            TrainEvent::Step(metrics) => {
                self.forward_step(metrics);
                Ok(())
            }
            other => {
                self.flush()?;
                self.tx.send(other).map_err(|_| ListenerGone)?;
                (self.wake)();
                Ok(())
            }
        }
    }

    fn forward_step(&mut self, metrics: StepMetrics) {
        let merged = match self.pending.take() {
            Some(mut p) => {
                p.absorb(&metrics);
                p
            }
            None => metrics,
        };
        match self.tx.try_send(TrainEvent::Step(merged)) {
            Ok(()) => (self.wake)(),
            Err(TrySendError::Full(TrainEvent::Step(m))) => self.pending = Some(m),
            Err(_) => {}
        }
    }

    /// Sends a lifecycle event (after any pending steps), waiting for room. Fails only when the
    /// listener is gone.
    pub fn send(&mut self, event: TrainEvent) -> Result<(), ListenerGone> {
        self.record(&event);
        if let Some(p) = self.pending.take() {
            self.tx
                .send(TrainEvent::Step(p))
                .map_err(|_| ListenerGone)?;
        }
        self.tx.send(event).map_err(|_| ListenerGone)?;
        (self.wake)();
        Ok(())
    }

    /// Sends any merged steps still waiting (blocking).
    pub fn flush(&mut self) -> Result<(), ListenerGone> {
        if let Some(p) = self.pending.take() {
            self.tx
                .send(TrainEvent::Step(p))
                .map_err(|_| ListenerGone)?;
            (self.wake)();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limited_wake_passes_the_first_call_and_drops_the_rest_of_its_gap() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let inner: Wake = Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let hourly = rate_limited(inner.clone(), std::time::Duration::from_secs(3600));
        for _ in 0..100 {
            hourly();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let always = rate_limited(inner, std::time::Duration::ZERO);
        for _ in 0..5 {
            always();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 6);
    }

    #[test]
    fn merged_steps_keep_each_tasks_token_weighted_loss() {
        let with = |n: u64, tasks: &[(&str, f64, u64)]| StepMetrics {
            task_loss: tasks
                .iter()
                .map(|&(t, loss, tokens)| TaskLoss {
                    task: t.to_string(),
                    loss,
                    tokens,
                })
                .collect(),
            ..step(n, 1.0)
        };
        let mut a = with(1, &[("math", 2.0, 10), ("code", 1.0, 5)]);
        a.absorb(&with(2, &[("math", 1.0, 30), ("tool", 3.0, 4)]));
        let get = |t: &str| a.task_loss.iter().find(|m| m.task == t).cloned().unwrap();
        assert_eq!(get("math").tokens, 40);
        assert!((get("math").loss - 1.25).abs() < 1e-12);
        assert_eq!((get("code").loss, get("tool").loss), (1.0, 3.0));
    }

    fn step(n: u64, loss: f64) -> StepMetrics {
        StepMetrics {
            step: n,
            epoch: n as f64 / 100.0,
            loss,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens_per_sec: 100.0,
            elapsed_s: n as f64,
            tokens_seen: n * 100,
            steps: 1,
            task_loss: Vec::new(),
        }
    }

    #[test]
    fn a_full_channel_merges_steps_and_loses_none() {
        let (mut tx, rx) = event_channel(2, Arc::new(|| {}));
        // Nobody reads while 10 steps arrive.
        for n in 1..=10 {
            tx.step(step(n, n as f64));
        }
        // Now a listener starts reading; the lifecycle event waits for room behind the merged steps.
        let listener = std::thread::spawn(move || {
            let mut events = Vec::new();
            while let Ok(e) = rx.recv() {
                let end = e.is_terminal();
                events.push(e);
                if end {
                    break;
                }
            }
            events
        });
        tx.send(TrainEvent::Finished { step: 10 }).unwrap();
        let events = listener.join().unwrap();
        let steps: Vec<StepMetrics> = events
            .iter()
            .filter_map(|e| match e {
                TrainEvent::Step(m) => Some(m.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(steps.iter().map(|m| m.steps).sum::<u32>(), 10);
        let total_loss: f64 = steps.iter().map(|m| m.loss * f64::from(m.steps)).sum();
        assert!((total_loss - 55.0).abs() < 1e-9);
        assert_eq!(steps.last().map(|m| m.step), Some(10));
        assert!(events.last().is_some_and(TrainEvent::is_terminal));
    }

    #[test]
    fn events_serialise_as_tagged_json_lines() {
        let e = TrainEvent::Eval(EvalMetrics {
            step: 5,
            task: "math".into(),
            prompt: PromptKind::Default,
            loss: 1.5,
            perplexity: 1.5f64.exp(),
            accuracy: 0.25,
            exact_match: None,
            items: 10,
            generated: 0,
            sample: None,
            steps_done: None,
            steps_tried: 0,
            tokens: 400,
        });
        let line = serde_json::to_string(&e).unwrap();
        assert!(line.starts_with("{\"event\":\"eval\""), "{line}");
        assert!(line.contains("\"prompt\":\"default\""), "{line}");
        let back: TrainEvent = serde_json::from_str(&line).unwrap();
        assert_eq!(back, e);
    }
}
