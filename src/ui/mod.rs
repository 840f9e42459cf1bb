//! The desktop studio (egui). Panels draw from view structs built in `core`; heavy work runs on
//! named worker threads.

mod app;

use std::path::PathBuf;

pub use app::StudioApp;

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

/// Opens the studio window on `project` and runs until it is closed.
pub fn run_studio(project: PathBuf) -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("MoI Studio")
            .with_inner_size([1280.0, 800.0])
            .with_min_inner_size([640.0, 400.0]),
        ..Default::default()
    };
    eframe::run_native(
        "MoI Studio",
        options,
        Box::new(move |cc| {
            let ctx = cc.egui_ctx.clone();
            let wake = std::sync::Arc::new(move || ctx.request_repaint());
            Ok(Box::new(StudioApp::open(project, wake)))
        }),
    )
    .map_err(|e| anyhow::anyhow!("the studio window could not start: {e}"))
}
