//! The live preview: what it depends on (its keys) and starting it on the `preview` thread
//! whenever those change.

use std::sync::Arc;

use crate::core::dataset::TaskData;
use crate::ui::app::{ModelPick, StudioApp};
use crate::ui::jobs::start_preview;

impl StudioApp {
    /// The keys of the preview: everything it depends on, and what tokenizing depends on.
    pub(crate) fn preview_keys(&self) -> (String, String) {
        let p = &self.project;
        let tasks: Vec<_> = p
            .tasks
            .iter()
            .map(|t| {
                serde_json::json!([
                    t.name,
                    t.system_prompt,
                    t.system_rule,
                    t.eval_fraction,
                    // Chained instructions change what is tokenized, and their templates' words
                    // what the built-in tokenizer learns.
                    t.sit,
                    t.sources
                        .iter()
                        .map(|s| s.path.display().to_string())
                        .collect::<Vec<_>>()
                ])
            })
            .collect();
        // The model decides the tokenizer and template of a run (its own, or the built-in).
        let model = match &self.model {
            ModelPick::Tiny => String::new(),
            ModelPick::Folder(path) | ModelPick::Gguf(path) => path.display().to_string(),
        };
        let prep = serde_json::json!({
            "model": model,
            "tasks": tasks,
            "default": p.default_system_prompt,
            "template": p.mixing.template,
            "tokenizer": p.mixing.tokenizer,
            "tokenizer_config": p.mixing.tokenizer_config,
            "labels": p.mixing.labels,
            "seed": p.seed,
        })
        .to_string();
        let weights: Vec<f64> = p.tasks.iter().map(|t| t.weight).collect();
        let all = serde_json::json!({
            "prep": prep,
            "mixing": p.mixing,
            "packing": p.packing,
            "weights": weights,
        })
        .to_string();
        (all, prep)
    }

    /// Starts a preview when the settings changed and none is running.
    pub(crate) fn refresh_preview(&mut self) {
        // The held-out split follows the tasks' eval shares, names and the seed as they are now,
        // so the table, the record browser's markers and the preview match what trains.
        let seed = self.project.seed;
        for (task, slot) in self.project.tasks.iter().zip(self.data.iter_mut()) {
            if let Some(d) = slot
                && d.split_key != crate::core::dataset::SplitKey::of(task, seed)
            {
                Arc::make_mut(d).resplit(task, seed);
            }
        }
        if self.preview.job.is_some() || !self.all_data_loaded() {
            return;
        }
        let (key, prep_key) = self.preview_keys();
        if key == self.preview.done_key {
            return;
        }
        let cached = self
            .preview
            .bundle
            .as_ref()
            .filter(|(k, _)| *k == prep_key)
            .map(|(_, b)| b.clone());
        let data: Vec<Arc<TaskData>> = self.data.iter().flatten().cloned().collect();
        match start_preview(
            self.project.clone(),
            data,
            cached,
            key.clone(),
            prep_key,
            self.model.choice(),
            self.wake.clone(),
        ) {
            Ok(rx) => self.preview.job = Some((rx, key)),
            Err(e) => self.status = e,
        }
    }
}
