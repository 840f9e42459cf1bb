//! The desktop studio (egui). Panels draw from view structs built in `core`; heavy work runs on
//! named worker threads.

mod app;
mod data_tab;
mod events;
mod experiments_tab;
mod jobs;
mod mixture_tab;
mod packing_tab;
mod preview;
mod project_actions;
mod runs_tab;
mod shell;
mod train_tab;

use std::path::PathBuf;

pub use app::{ModelPick, StudioApp, Tab};

/// Where the studio keeps what it reopens with (in eframe's storage).
pub(crate) const STORAGE_KEY: &str = "moi-studio";

/// What the studio remembers between sessions.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Persisted {
    /// The project open when the window closed.
    pub last_project: Option<PathBuf>,
    /// Recently opened projects, newest first.
    pub recent: Vec<PathBuf>,
    /// The tab shown.
    pub tab: Tab,
}

/// Why the studio cannot open a window here, or `None` when it can try.
pub fn no_display_reason() -> Option<String> {
    if cfg!(target_os = "linux") {
        let set = |v: &str| std::env::var_os(v).is_some_and(|s| !s.is_empty());
        if !set("DISPLAY") && !set("WAYLAND_DISPLAY") {
            return Some(
                "no display found (neither DISPLAY nor WAYLAND_DISPLAY is set), so the studio \
                 cannot open a window"
                    .to_string(),
            );
        }
    }
    None
}

/// Opens the studio window and runs until it is closed: on `project` when given, else on the
/// project open last time (if it still exists), else on `fallback` (the demo).
pub fn run_studio(project: Option<PathBuf>, fallback: PathBuf) -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("MoI Studio")
            .with_inner_size([1360.0, 880.0])
            .with_min_inner_size([720.0, 480.0])
            .with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "MoI Studio",
        options,
        Box::new(move |cc| {
            let ctx = cc.egui_ctx.clone();
            let wake = std::sync::Arc::new(move || ctx.request_repaint());
            let remembered: Option<Persisted> = cc
                .storage
                .and_then(|s| s.get_string(STORAGE_KEY))
                .and_then(|t| serde_json::from_str(&t).ok());
            let path = project
                .or_else(|| {
                    remembered
                        .as_ref()
                        .and_then(|r| r.last_project.clone())
                        .filter(|p| p.is_file())
                })
                .unwrap_or(fallback);
            let mut app = StudioApp::open(path, wake);
            // Runs train in a child process, so running out of memory ends the run, not the
            // window (a thread stays the fallback when this program cannot be found).
            app.trainer_process = crate::train::process::TrainerProcess::this_program().ok();
            if let Some(r) = remembered {
                app.remember(r.recent, r.tab);
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("the studio window could not start: {e}"))
}

#[cfg(test)]
mod tests;
