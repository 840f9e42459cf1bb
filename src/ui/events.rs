//! Draining the workers' channels within a few milliseconds per frame, and the training
//! commands the Train tab sends.

use std::time::{Duration, Instant};

use crate::core::events::{TrainCommand, TrainEvent};
use crate::core::runs::{RunHistory, list_runs};
use crate::ui::app::{StudioApp, TrainState};
use crate::ui::jobs::LoadEvent;

/// How often the window repaints while a job runs, and the shortest gap between two repaints
/// its events ask for: three frames a second keep the live plots moving, and under software
/// rendering (no GPU) each frame's cost is taken from the training the plots show.
pub(crate) const LIVE_WAKE_GAP: Duration = Duration::from_millis(333);

impl StudioApp {
    pub fn drain_events(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(6);
        // Data.
        if let Some((rx, _, _)) = &self.loading {
            let mut finished = false;
            let mut got = Vec::new();
            while Instant::now() < deadline {
                match rx.try_recv() {
                    Ok(e) => got.push(e),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        finished = true;
                        break;
                    }
                }
            }
            for e in got {
                match e {
                    LoadEvent::Progress { task, fraction } => {
                        if let Some((_, t, f)) = &mut self.loading {
                            (*t, *f) = (task, fraction);
                        }
                    }
                    LoadEvent::Task {
                        task,
                        data,
                        generation,
                    } => {
                        if generation == self.load_generation
                            && let Some(slot) = self.data.get_mut(task)
                        {
                            let rejected = data.rejected();
                            if rejected > 0 || data.failed_sources() > 0 {
                                self.status = format!(
                                    "{}: {} records, {rejected} rejected",
                                    data.name,
                                    data.records.len()
                                );
                            }
                            *slot = Some(data);
                        }
                    }
                }
            }
            if finished {
                self.loading = None;
                if self.all_data_loaded() && self.status.starts_with("importing") {
                    self.status = "import finished".to_string();
                }
            }
        }
        // Previews.
        if let Some((rx, _)) = &self.preview.job
            && let Ok(r) = rx.try_recv()
        {
            self.preview.job = None;
            self.preview.done_key = r.key;
            self.preview.took = r.took;
            match r.bundle {
                Ok(b) => {
                    self.preview.bundle = Some((r.prep_key, b));
                    self.preview.error = r.pack_error;
                }
                Err(e) => self.preview.error = Some(e),
            }
            self.preview.mixture = r.mixture;
            self.preview.packing = r.packing;
            self.preview.plan = r.plan;
            self.preview.pack = r.pack;
            self.preview.context_note = r.context_note;
            if r.model_context.is_some() {
                self.preview.model_context = r.model_context;
            }
            self.preview.chips = None;
            if let Some(plan) = &self.preview.plan {
                self.preview.row = self.preview.row.min(plan.rows.len().saturating_sub(1));
            }
        }
        // Dialogs and small jobs.
        if let Some(rx) = &self.dialog
            && let Ok((kind, paths)) = rx.try_recv()
        {
            self.dialog = None;
            self.on_dialog(kind, paths);
        }
        if let Some(rx) = &self.export_job
            && let Ok(r) = rx.try_recv()
        {
            self.export_job = None;
            self.status = match r {
                Ok(message) => message,
                Err(e) => format!("export failed: {e}"),
            };
        }
        if let Some(rx) = &self.try_it.job
            && let Ok(r) = rx.try_recv()
        {
            self.try_it.job = None;
            self.try_it.answer = r.unwrap_or_else(|e| format!("(no answer: {e})"));
        }
        while let Ok((dir, h)) = self.history_channel.1.try_recv() {
            match h {
                Ok(h) => {
                    self.run_histories.insert(dir, h);
                }
                Err(e) => {
                    self.selected_runs.remove(&dir);
                    self.status = e;
                }
            }
        }
        // Training: every event is taken in; steps arrive merged when the UI was slow.
        self.drain_training(deadline);
        self.drain_experiments();
    }

    pub(crate) fn drain_training(&mut self, deadline: Instant) {
        let Some(train) = &mut self.train else {
            return;
        };
        let Some(handle) = &train.handle else {
            return;
        };
        let mut ended = false;
        loop {
            match handle.events.try_recv() {
                Ok(event) => {
                    self.history.absorb(&event);
                    match &event {
                        TrainEvent::Generated { step, text, .. } => {
                            self.try_it.answer = if text.trim().is_empty() {
                                format!(
                                    "(step {step}: an empty answer, the model ended its turn at once)"
                                )
                            } else {
                                format!("(step {step}) {text}")
                            };
                            self.try_it.asked_trainer = false;
                        }
                        TrainEvent::Log { message } => self.status = message.clone(),
                        TrainEvent::Checkpoint { step, .. } => {
                            self.status = format!("checkpoint at step {step}");
                        }
                        TrainEvent::Finished { step } => {
                            self.status = format!("training finished at step {step}");
                        }
                        TrainEvent::Stopped { step } => {
                            self.status = format!("training stopped at step {step}");
                        }
                        TrainEvent::Failed { error } => {
                            self.status = format!("training failed: {error}");
                        }
                        _ => {}
                    }
                    if event.is_terminal() {
                        ended = true;
                        break;
                    }
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    ended = true;
                    break;
                }
            }
            if Instant::now() > deadline {
                // More is waiting: come back next frame.
                (self.wake)();
                break;
            }
        }
        if ended {
            if let Some(h) = train.handle.take() {
                h.join();
            }
            train.paused = false;
            self.try_it.asked_trainer = false;
            self.runs_loaded = false;
        }
    }

    /// Starts training the project with the chosen model.
    pub fn start_training(&mut self) {
        if self.is_training() {
            return;
        }
        if self.experiments.is_running() {
            self.status = "an ablation is running; stop it before training".to_string();
            return;
        }
        let mut refused = self.start_refusals();
        if self.chosen_model_context().is_none() {
            // No preview for this model yet: read its context now (a config file or a GGUF
            // header) so a row length it cannot read never reaches the worker.
            if let Ok(context) = crate::train::worker::model_context(&self.model.choice()) {
                refused.extend(self.row_length_problem(context));
            }
        }
        if !refused.is_empty() {
            self.status = format!("not started: {}", refused.join("; "));
            return;
        }
        let mut spec =
            crate::train::worker::RunSpec::new(self.project.clone(), self.model.choice());
        spec.max_steps = self.steps_override;
        self.launch(spec);
    }

    /// The longest sequence the chosen model reads, as the last preview found it (None until a
    /// preview for this model has run).
    pub(crate) fn chosen_model_context(&self) -> Option<usize> {
        let choice = self.model.choice();
        match &self.preview.model_context {
            Some((model, context)) if *model == choice => Some(*context),
            _ => None,
        }
    }

    /// Why the row length cannot be trained with the chosen model, when it cannot.
    pub(crate) fn row_length_refusal(&self) -> Option<String> {
        self.row_length_problem(self.chosen_model_context()?)
    }

    /// Why the row length cannot be trained with a model that reads `context` tokens.
    fn row_length_problem(&self, context: usize) -> Option<String> {
        let len = self.project.packing.max_seq_len;
        (len > context)
            .then(|| format!("the row length {len} is above the {context} tokens the model reads"))
    }

    /// Every reason the current settings cannot start a run (empty when they can).
    pub(crate) fn start_refusals(&self) -> Vec<String> {
        let mut refused: Vec<String> = self
            .project
            .training
            .refusals()
            .into_iter()
            .map(str::to_string)
            .collect();
        refused.extend(self.row_length_refusal());
        refused
    }

    /// Continues a stopped, failed or cut-off run from its newest good checkpoint, with the
    /// project and model it ran with; its curves so far are drawn again from its record.
    pub fn resume_training(&mut self, run_dir: std::path::PathBuf) {
        if self.is_training() {
            return;
        }
        if self.experiments.is_running() {
            self.status = "an ablation is running; stop it before training".to_string();
            return;
        }
        match crate::train::worker::resume_spec(&run_dir) {
            Ok(mut spec) => {
                spec.replay_history = true;
                self.launch(spec);
                if self.is_training() {
                    self.set_tab(crate::ui::Tab::Train);
                }
            }
            Err(e) => {
                self.status = format!("cannot resume {}: {e:#}", run_dir.display());
            }
        }
    }

    fn launch(&mut self, spec: crate::train::worker::RunSpec) {
        // The window repaints on a timer while training (see the shell); steps wake it at most
        // as often as that timer.
        let wake = crate::core::events::rate_limited(self.wake.clone(), LIVE_WAKE_GAP);
        let spawned = match &self.trainer_process {
            Some(process) => crate::train::process::spawn_run_process(spec, wake, process),
            None => crate::train::worker::spawn_run(spec, wake),
        };
        match spawned {
            Ok(handle) => {
                self.history = RunHistory::default();
                self.status = format!("training in {}", handle.run_dir.display());
                self.train = Some(TrainState {
                    run_dir: handle.run_dir.clone(),
                    handle: Some(handle),
                    paused: false,
                });
            }
            Err(e) => self.status = format!("could not start training: {e:#}"),
        }
    }

    /// Sends a command to the running trainer; whether it was taken.
    pub fn command(&mut self, command: TrainCommand) -> bool {
        if let Some(TrainState {
            handle: Some(h),
            paused,
            ..
        }) = &mut self.train
        {
            if matches!(command, TrainCommand::Stop) {
                h.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            let kind = std::mem::discriminant(&command);
            if h.commands.try_send(command).is_err() {
                // The state below only changes once the worker has the command.
                self.status = "the trainer is busy; try again".to_string();
                return false;
            }
            if kind == std::mem::discriminant(&TrainCommand::Pause) {
                *paused = true;
            } else if kind == std::mem::discriminant(&TrainCommand::Resume) {
                *paused = false;
            }
            return true;
        }
        false
    }

    /// The past runs beside the project.
    pub(crate) fn refresh_runs(&mut self) {
        self.runs = list_runs(&self.project.runs_dir());
        self.runs_loaded = true;
    }
}
