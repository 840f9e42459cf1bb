//! System-prompt presets shipped in `presets/system_prompts.toml` and built into the binary.

use serde::Deserialize;

/// A named system prompt for a kind of task.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PromptPreset {
    /// Name shown in the presets menu.
    pub name: String,
    /// The kind of task it is meant for.
    pub task: String,
    /// The prompt text.
    pub prompt: String,
}

#[derive(Deserialize)]
struct PresetFile {
    preset: Vec<PromptPreset>,
}

const PRESETS_TOML: &str = include_str!("../../presets/system_prompts.toml");

/// The built-in system-prompt presets, the paper's default first.
pub fn prompt_presets() -> Vec<PromptPreset> {
    // The file is part of the build; a test below proves it parses.
    toml::from_str::<PresetFile>(PRESETS_TOML)
        .map(|f| f.preset)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::project::DEFAULT_SYSTEM_PROMPT;

    #[test]
    fn presets_parse_and_hold_the_papers_prompts() {
        let presets = prompt_presets();
        assert!(presets.len() >= 4);
        assert_eq!(presets[0].prompt, DEFAULT_SYSTEM_PROMPT);
        assert!(presets.iter().any(|p| p.prompt == "You are a programmer."));
        assert!(presets.iter().any(|p| p.task == "math"));
        assert!(presets.iter().any(|p| p.task == "tool use"));
    }
}
