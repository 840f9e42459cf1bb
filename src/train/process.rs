//! Training in a child process, so that running out of memory ends the run and not the studio.
//!
//! A failed allocation aborts a Rust process, and the kernel's out-of-memory killer takes the
//! whole process: a trainer on a thread of the studio would take the window and its unsaved edits
//! with it. The studio therefore starts `moi-studio worker`, writes it the run's spec as one JSON
//! line on its stdin and its commands as further lines, and reads its events as JSON lines from
//! its stdout. The child writes `metrics.jsonl` and checkpoints as a thread-run worker does. When
//! the child dies without a last event, the parent says why (the signal, the allocation that
//! failed, the memory limit) and which checkpoint is left to resume, and records that in
//! `metrics.jsonl`. When the studio goes away, the child's stdin closes and the run stops after
//! a checkpoint.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::core::events::{TrainCommand, TrainEvent, Wake, event_channel};
use crate::core::packing::PackMode;
use crate::core::project::Project;
use crate::train::trainer::{latest_good_checkpoint, load_trainer_state};
use crate::train::worker::{ModelChoice, RunSpec, TrainHandle, run_dir_of, spawn_run};

/// What starts the child: a program, its arguments and environment, and a memory limit.
#[derive(Debug, Clone)]
pub struct TrainerProcess {
    /// The program (`moi-studio` itself in the studio).
    pub program: PathBuf,
    /// Its arguments (`worker`).
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(OsString, OsString)>,
    /// An address-space limit (`RLIMIT_AS`, bytes) for the child: past it allocations fail.
    pub memory_limit: Option<u64>,
}

impl TrainerProcess {
    /// This program's `worker` command.
    pub fn this_program() -> std::io::Result<Self> {
        Ok(Self {
            program: std::env::current_exe()?,
            args: vec!["worker".into()],
            env: Vec::new(),
            memory_limit: None,
        })
    }
}

/// What a child's stdout line starts with when it carries an event; other lines are ignored.
pub const EVENT_PREFIX: &str = "moi-event ";

/// A run spec as it crosses to the child.
#[derive(Debug, Serialize, Deserialize)]
struct WireSpec {
    project_toml: String,
    base_dir: PathBuf,
    /// None for the built-in tiny model.
    model: Option<PathBuf>,
    mode: Option<PackMode>,
    max_steps: Option<u64>,
    runs_dir: PathBuf,
    force_cpu: bool,
    lora: Option<bool>,
    resume: Option<PathBuf>,
    name: Option<String>,
    replay_history: bool,
}

impl WireSpec {
    fn of(spec: &RunSpec) -> Self {
        Self {
            project_toml: spec.project.to_toml(),
            base_dir: spec.project.base_dir.clone(),
            model: match &spec.model {
                ModelChoice::Tiny => None,
                ModelChoice::Path(p) => Some(p.clone()),
            },
            mode: spec.mode,
            max_steps: spec.max_steps,
            runs_dir: spec.runs_dir.clone(),
            force_cpu: spec.force_cpu,
            lora: spec.lora,
            resume: spec.resume.clone(),
            name: spec.name.clone(),
            replay_history: spec.replay_history,
        }
    }

    fn into_spec(self) -> anyhow::Result<RunSpec> {
        let mut project =
            Project::from_toml(&self.project_toml, &self.base_dir.join("project.moi.toml"))?;
        project.base_dir = self.base_dir;
        let model = self.model.map_or(ModelChoice::Tiny, ModelChoice::Path);
        let mut spec = RunSpec::new(project, model);
        spec.mode = self.mode;
        spec.max_steps = self.max_steps;
        spec.runs_dir = self.runs_dir;
        spec.force_cpu = self.force_cpu;
        spec.lora = self.lora;
        spec.resume = self.resume;
        spec.name = self.name;
        spec.replay_history = self.replay_history;
        Ok(spec)
    }
}

/// The child's side: reads the spec line from `input`, runs the worker, writes each event to
/// `output` as a line, and takes commands from the rest of `input` until the run ends. When
/// `input` closes (the studio is gone) the run stops after a checkpoint.
pub fn serve(
    mut input: impl BufRead + Send + 'static,
    mut output: impl Write,
) -> anyhow::Result<()> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .context("reading the run spec from stdin")?;
    let wire: WireSpec = serde_json::from_str(&line).context("reading the run spec")?;
    let handle = spawn_run(wire.into_spec()?, Arc::new(|| {}))?;
    let (stop, commands) = (handle.stop.clone(), handle.commands.clone());
    std::thread::Builder::new()
        .name("trainer-commands".to_string())
        .spawn(move || {
            for line in input.lines() {
                let Ok(line) = line else { break };
                let Ok(command) = serde_json::from_str::<TrainCommand>(&line) else {
                    continue;
                };
                if command == TrainCommand::Stop {
                    stop.store(true, Ordering::SeqCst);
                }
                if commands.send(command).is_err() {
                    return;
                }
            }
            // The studio is gone: stop after a checkpoint.
            stop.store(true, Ordering::SeqCst);
            let _ = commands.try_send(TrainCommand::Stop);
        })
        .context("starting the command reader")?;
    let mut listener_gone = false;
    for event in handle.events.iter() {
        let end = event.is_terminal();
        if !listener_gone {
            let written = serde_json::to_string(&event)
                .map_err(std::io::Error::other)
                .and_then(|json| writeln!(output, "{EVENT_PREFIX}{json}"))
                .and_then(|()| output.flush());
            if written.is_err() {
                // Keep training to a checkpoint; the events are still in metrics.jsonl.
                listener_gone = true;
                handle.stop.store(true, Ordering::SeqCst);
            }
        }
        if end {
            break;
        }
    }
    handle.join();
    Ok(())
}

/// Starts a run in a child process (see the module notes). The handle works as the thread
/// worker's does: events in order (steps merged, never dropped, when the listener is slow),
/// commands, and `join`, which waits for the child to end.
pub fn spawn_run_process(
    mut spec: RunSpec,
    wake: Wake,
    process: &TrainerProcess,
) -> anyhow::Result<TrainHandle> {
    let run_dir = run_dir_of(&spec);
    if spec.resume.is_none() {
        spec.name = run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
    }
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let spec_line = serde_json::to_string(&WireSpec::of(&spec))?;

    let mut command = Command::new(&process.program);
    command
        .args(&process.args)
        .envs(process.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(limit) = process.memory_limit {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent's.
        unsafe {
            command.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: limit as libc::rlim_t,
                    rlim_max: limit as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting the trainer {}", process.program.display()))?;
    let (mut stdin, stdout, stderr) =
        match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
            (Some(i), Some(o), Some(e)) => (i, o, e),
            _ => anyhow::bail!("the trainer process has no pipes"),
        };

    let (cmd_tx, cmd_rx) = crossbeam_channel::bounded::<TrainCommand>(16);
    std::thread::Builder::new()
        .name("trainer-stdin".to_string())
        .spawn(move || {
            if writeln!(stdin, "{spec_line}")
                .and_then(|()| stdin.flush())
                .is_err()
            {
                return;
            }
            // Ends when the handle is dropped: stdin closes and a child still running stops.
            for command in cmd_rx.iter() {
                let Ok(json) = serde_json::to_string(&command) else {
                    continue;
                };
                if writeln!(stdin, "{json}")
                    .and_then(|()| stdin.flush())
                    .is_err()
                {
                    return;
                }
            }
        })
        .context("starting the trainer's command writer")?;

    // The last lines the child wrote to stderr, for the message when it dies; passed on too.
    let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let stderr_tail = tail.clone();
    let stderr_thread = std::thread::Builder::new()
        .name("trainer-stderr".to_string())
        .spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                if is_backtrace_noise(&line) {
                    continue;
                }
                let mut t = stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() == 20 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        })
        .context("starting the trainer's stderr reader")?;

    let (mut events, rx) = event_channel(256, wake);
    let dir = run_dir.clone();
    let limit = process.memory_limit;
    let thread = std::thread::Builder::new()
        .name("trainer-events".to_string())
        .spawn(move || {
            let mut ended = false;
            let mut last_step = 0;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Some(event) = line
                    .strip_prefix(EVENT_PREFIX)
                    .and_then(|json| serde_json::from_str::<TrainEvent>(json).ok())
                else {
                    continue;
                };
                ended |= event.is_terminal();
                if let TrainEvent::Step(m) = &event {
                    last_step = m.step;
                }
                // The child wrote metrics.jsonl; here the events only go to the window. A window
                // that has gone away still reads nothing, and the child keeps its pipe drained.
                let _ = events.replay(event);
            }
            let status = child.wait();
            let _ = stderr_thread.join();
            if ended {
                return;
            }
            let stderr: Vec<String> = tail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect();
            let error = match status {
                Ok(status) => death_message(status, &stderr, limit, last_step, &dir),
                Err(e) => format!("the training process could not be waited for: {e}"),
            };
            let failed = TrainEvent::Failed { error };
            if let Err(e) = append_event(&dir.join("metrics.jsonl"), &failed) {
                eprintln!("could not record the failure in {}: {e}", dir.display());
            }
            let _ = events.replay(failed);
        })
        .context("starting the trainer's event reader")?;
    // Stop reaches the child as a command (callers send it with the flag set); nothing here
    // reads the flag.
    Ok(TrainHandle::new(
        rx,
        cmd_tx,
        Arc::new(AtomicBool::new(false)),
        run_dir,
        thread,
    ))
}

/// A backtrace's frames and notes, left out of the lines a failure message quotes.
fn is_backtrace_noise(line: &str) -> bool {
    let t = line.trim_start();
    let frame = t
        .split_once(": ")
        .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    frame
        || t.starts_with("at ")
        || t.starts_with("note: ")
        || t == "stack backtrace:"
        || t.is_empty()
}

/// Why a child ended without its last event, what that most likely means, and what is left.
fn death_message(
    status: ExitStatus,
    stderr: &[String],
    limit: Option<u64>,
    last_step: u64,
    run_dir: &Path,
) -> String {
    use std::os::unix::process::ExitStatusExt;
    let how = match (status.signal(), status.code()) {
        (Some(libc::SIGABRT), _) => "aborted (SIGABRT)".to_string(),
        (Some(libc::SIGKILL), _) => "was killed (SIGKILL)".to_string(),
        (Some(libc::SIGSEGV), _) => "crashed (SIGSEGV)".to_string(),
        (Some(n), _) => format!("was ended by signal {n}"),
        (None, Some(code)) => format!("exited with status {code} without a last event"),
        (None, None) => "ended".to_string(),
    };
    let allocation = stderr
        .iter()
        .rev()
        .find(|l| l.contains("memory allocation of") && l.contains("failed"));
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let why = match (allocation, limit) {
        (Some(line), Some(limit)) => format!(
            ": it ran out of memory (\"{}\") under the trainer's limit of {:.1} GiB",
            line.trim(),
            gib(limit)
        ),
        (Some(line), None) => format!(
            ": it ran out of memory (\"{}\"); the machine's memory was taken, by this run or by \
             other programs",
            line.trim()
        ),
        (None, _) if status.signal() == Some(libc::SIGKILL) => {
            ": when memory runs out, the kernel's out-of-memory killer does this (or another \
             program did)"
                .to_string()
        }
        (None, _) => match stderr.last() {
            Some(line) => format!(": {}", line.trim().trim_end_matches('.')),
            None => String::new(),
        },
    };
    let at = if last_step > 0 {
        format!(" after step {last_step}")
    } else {
        String::new()
    };
    let left = match latest_good_checkpoint(run_dir).0 {
        Some(c) => {
            let step = load_trainer_state(&c).map(|s| s.step).unwrap_or(0);
            format!(
                " The last checkpoint, {} (step {step}), is whole: Resume in the Runs tab \
                 continues from it.",
                c.file_name().unwrap_or_default().to_string_lossy()
            )
        }
        None => " It had written no checkpoint, so the run has to start again.".to_string(),
    };
    format!("the training process {how}{at}{why}.{left}")
}

/// Appends one event to a run's `metrics.jsonl`, first cutting a last line the dead child left
/// half written.
fn append_event(path: &Path, event: &TrainEvent) -> std::io::Result<()> {
    let text = std::fs::read(path).unwrap_or_default();
    if !text.is_empty() && !text.ends_with(b"\n") {
        let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(keep as u64)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let json = serde_json::to_string(event).map_err(std::io::Error::other)?;
    writeln!(file, "{json}")?;
    file.sync_data()
}
