//! Keeps `src/core` pure: no GUI and no model crates, so it stays testable without either.

use std::path::Path;

const FORBIDDEN: [&str; 6] = [
    "egui",
    "eframe",
    "egui_plot",
    "egui_kittest",
    "rfd",
    "candle",
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Crate names a line of Rust refers to as a path root (`use x::…`, `x::y`, `extern crate x`).
fn crate_roots(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut roots = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_alphabetic() || bytes[i] == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let word = &code[start..i];
            let before = code[..start].trim_end();
            let path_start = !before.ends_with("::") && !before.ends_with('.');
            let is_path = code[i..].starts_with("::");
            let extern_crate = before.ends_with("extern crate");
            if path_start && (is_path || extern_crate) {
                roots.push(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    roots
}

#[test]
fn core_imports_no_gui_or_model_crate() {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core"),
        &mut files,
    );
    assert!(files.len() > 5, "src/core not found");
    let mut offenders = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for root in crate_roots(line) {
                if FORBIDDEN
                    .iter()
                    .any(|f| root == *f || root.starts_with("candle_"))
                {
                    offenders.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "src/core must not use GUI or model crates:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_checker_catches_what_it_should() {
    assert_eq!(crate_roots("use egui::Ui;"), ["egui"]);
    assert_eq!(
        crate_roots("let t = candle_core::Tensor::new(x);"),
        ["candle_core"]
    );
    assert_eq!(crate_roots("extern crate eframe;"), ["eframe"]);
    assert!(crate_roots("// use egui::Ui;").is_empty());
    assert_eq!(crate_roots("use crate::core::egui_like::X;"), ["crate"]);
}

/// The `crate::core::x` modules each file of `src/core` uses outside its tests.
fn core_module_graph() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let core = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let mut files = Vec::new();
    rust_files(&core, &mut files);
    let mut graph: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for file in &files {
        let rel = file.strip_prefix(&core).unwrap();
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let text = std::fs::read_to_string(file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let deps = graph.entry(module.clone()).or_default();
        for part in code.split("crate::core::").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                deps.insert(name);
            }
        }
    }
    graph
}

#[test]
fn core_modules_import_each_other_without_cycles() {
    let graph = core_module_graph();
    assert!(graph.contains_key("project") && graph.contains_key("settings"));
    // Depth-first search for a path back to where it started.
    fn cycle_from(
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        let last = path.last().cloned()?;
        for next in graph.get(&last).into_iter().flatten() {
            if let Some(at) = path.iter().position(|p| p == next) {
                let mut cycle = path[at..].to_vec();
                cycle.push(next.clone());
                return Some(cycle);
            }
            path.push(next.clone());
            if let Some(c) = cycle_from(graph, path) {
                return Some(c);
            }
            path.pop();
        }
        None
    }
    for start in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, &mut vec![start.clone()]) {
            panic!("src/core has an import cycle: {}", cycle.join(" -> "));
        }
    }
}
