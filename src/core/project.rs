//! The project file: tasks with their data sources and system prompts, the default system prompt,
//! and the settings later stages add. Saved as human-editable TOML with paths relative to the file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::eval::AnswerCheck;
use crate::core::fsutil::{normalize, relative_to, write_atomic};
use crate::core::import::{ColumnMapping, Format, ImportOptions};
use crate::core::packing::PackSettings;
use crate::core::record::SystemRule;
use crate::core::settings::MixSettings;
use crate::core::sit::SitSettings;
use crate::core::train_settings::TrainSettings;

/// The project-file layout this build writes.
pub const PROJECT_FORMAT_VERSION: u32 = 1;
/// The paper's default system prompt, used unless the project sets another.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";
/// The usual file-name ending of a project file.
pub const PROJECT_EXTENSION: &str = "moi.toml";

/// A data file of a task, with how to read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// The file, relative to the project file (or absolute).
    pub path: PathBuf,
    /// The dataset format; detected from the first records when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// Field names to read roles from, for files whose names are not the usual ones.
    #[serde(default, skip_serializing_if = "ColumnMapping::is_empty")]
    pub map: ColumnMapping,
}

impl Source {
    /// A source read with detected format and no mapping.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            format: None,
            map: ColumnMapping::default(),
        }
    }
}

fn default_weight() -> f64 {
    1.0
}

fn default_eval_fraction() -> f64 {
    0.1
}

fn default_max_new_tokens() -> usize {
    256
}

fn is_default_max_new_tokens(n: &usize) -> bool {
    *n == default_max_new_tokens()
}

/// A task: one kind of instruction (math, code, tool use …) with its own system prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Unique name, shown everywhere the task appears.
    pub name: String,
    /// The system prompt this task's instructions are trained under.
    pub system_prompt: String,
    /// What to do with a record's own system message.
    #[serde(default)]
    pub system_rule: SystemRule,
    /// Relative sampling weight, used by the weighted sampling strategy.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Share of the task's records held out for evaluation (0 to 0.9).
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// How generated answers are checked for exact match at evaluation.
    #[serde(default, skip_serializing_if = "AnswerCheck::is_none")]
    pub answer_check: AnswerCheck,
    /// Longest answer generated for the exact-match check.
    #[serde(
        default = "default_max_new_tokens",
        skip_serializing_if = "is_default_max_new_tokens"
    )]
    pub max_new_tokens: usize,
    /// The files the task's records come from.
    #[serde(default)]
    pub sources: Vec<Source>,
    /// Sequential instructions: the share composed into chains and the step templates.
    #[serde(default, skip_serializing_if = "SitSettings::is_default")]
    pub sit: SitSettings,
}

impl Task {
    /// A task with defaults for everything but its name and prompt.
    pub fn new(name: impl Into<String>, system_prompt: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            system_prompt: system_prompt.into(),
            system_rule: SystemRule::default(),
            weight: default_weight(),
            eval_fraction: default_eval_fraction(),
            answer_check: AnswerCheck::None,
            max_new_tokens: default_max_new_tokens(),
            sources: Vec::new(),
            sit: SitSettings::default(),
        }
    }
}

fn default_system_prompt() -> String {
    DEFAULT_SYSTEM_PROMPT.to_string()
}

fn default_seed() -> u64 {
    42
}

fn current_version() -> u32 {
    PROJECT_FORMAT_VERSION
}

/// A MoI Studio project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Project {
    /// Layout version of the file; older layouts are migrated when opened.
    #[serde(default = "current_version")]
    pub format_version: u32,
    /// A display name.
    #[serde(default)]
    pub name: String,
    /// The system prompt put first in every MoI pack and used at inference.
    #[serde(default = "default_system_prompt")]
    pub default_system_prompt: String,
    /// Seed for every random choice (eval split, sampling, shuffling).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Sampling, template and label settings.
    #[serde(default)]
    pub mixing: MixSettings,
    /// Packing settings.
    #[serde(default)]
    pub packing: PackSettings,
    /// Training settings.
    #[serde(default)]
    pub training: TrainSettings,
    /// The tasks, in display order.
    #[serde(default)]
    pub tasks: Vec<Task>,
    /// Sections this build does not know (written by a newer build or by hand), kept as they are
    /// so that saving never loses them.
    #[serde(flatten)]
    pub other: toml::Table,
    /// The folder relative paths are resolved against (the project file's folder).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl Default for Project {
    fn default() -> Self {
        Self {
            format_version: PROJECT_FORMAT_VERSION,
            name: String::new(),
            default_system_prompt: default_system_prompt(),
            seed: default_seed(),
            mixing: MixSettings::default(),
            packing: PackSettings::default(),
            training: TrainSettings::default(),
            tasks: Vec::new(),
            other: toml::Table::new(),
            base_dir: PathBuf::from("."),
        }
    }
}

/// Why a project file could not be opened or saved.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// Reading or writing the file failed.
    #[error("cannot {action} project file: {source} ({})", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the layout; the message names the line.
    #[error("bad project file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// The file is valid TOML but a value makes no sense.
    #[error("bad project file: {why} ({})", path.display())]
    Invalid { path: PathBuf, why: String },
    /// A newer build wrote the file.
    #[error(
        "the project file has format version {found}, newer than this build reads ({supported}); \
         update MoI Studio ({})", path.display()
    )]
    Newer {
        path: PathBuf,
        found: i64,
        supported: u32,
    },
}

/// One step that turns a file of version `n` into version `n + 1`, by index `n - 1`.
type Migration = fn(&mut toml::Table);

/// The migrations, oldest first. Version 1 is the first released layout, so there are none yet;
/// when the layout changes, a step is added here and [`PROJECT_FORMAT_VERSION`] goes up.
const MIGRATIONS: &[Migration] = &[];

/// Brings a parsed file up to the current layout. Files without a version are taken as version 1.
fn migrate(table: &mut toml::Table, path: &Path) -> Result<(), ProjectError> {
    let version = match table.get("format_version") {
        None => 1,
        Some(toml::Value::Integer(v)) => *v,
        Some(other) => {
            return Err(ProjectError::Invalid {
                path: path.to_path_buf(),
                why: format!(
                    "format_version is {}, expected a whole number",
                    other.type_str()
                ),
            });
        }
    };
    if version > i64::from(PROJECT_FORMAT_VERSION) {
        return Err(ProjectError::Newer {
            path: path.to_path_buf(),
            found: version,
            supported: PROJECT_FORMAT_VERSION,
        });
    }
    if version < 1 {
        return Err(ProjectError::Invalid {
            path: path.to_path_buf(),
            why: format!("format_version {version} is not a version this program ever wrote"),
        });
    }
    for step in &MIGRATIONS[(version - 1) as usize..] {
        step(table);
    }
    table.insert(
        "format_version".to_string(),
        toml::Value::Integer(i64::from(PROJECT_FORMAT_VERSION)),
    );
    Ok(())
}

/// The folder of the presets bundled with the studio (its source tree's `presets/`).
pub fn bundled_presets_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets")
}

impl Project {
    /// Opens a project file.
    pub fn load(path: &Path) -> Result<Self, ProjectError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProjectError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        })?;
        let mut project = Self::from_toml(&text, path)?;
        project.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        // What a save killed midway left beside the file (the file itself is whole).
        crate::core::fsutil::remove_dead_temps(&project.base_dir);
        Ok(project)
    }

    /// Parses project-file text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ProjectError> {
        let parse_err = |e: toml::de::Error| ProjectError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        };
        let mut table: toml::Table = toml::from_str(text).map_err(parse_err)?;
        migrate(&mut table, path)?;
        // Re-serialise the migrated table so serde reports problems against the same keys; line
        // numbers come from the first parse, which already succeeded.
        let project: Project = if MIGRATIONS.is_empty() {
            toml::from_str(text).map_err(parse_err)?
        } else {
            toml::Value::Table(table).try_into().map_err(parse_err)?
        };
        let mut project = project;
        project.format_version = PROJECT_FORMAT_VERSION;
        project.validate(path)?;
        Ok(project)
    }

    /// Checks values that TOML types cannot: unique task names, sensible weights and fractions.
    pub fn validate(&self, path: &Path) -> Result<(), ProjectError> {
        let invalid = |why: String| ProjectError::Invalid {
            path: path.to_path_buf(),
            why,
        };
        let packing = &self.packing;
        if packing.max_seq_len < 16 {
            return Err(invalid(format!(
                "packing.max_seq_len {} is too small (16 tokens at least)",
                packing.max_seq_len
            )));
        }
        let t = self.mixing.temperature;
        if !(t.is_finite() && t > 0.0) {
            return Err(invalid(format!(
                "mixing.temperature {t} must be above zero"
            )));
        }
        for (i, task) in self.tasks.iter().enumerate() {
            let which = format!("task {} (\"{}\")", i + 1, task.name);
            if task.name.trim().is_empty() {
                return Err(invalid(format!("task {} has an empty name", i + 1)));
            }
            if self.tasks[..i].iter().any(|t| t.name == task.name) {
                return Err(invalid(format!("{which}: another task has the same name")));
            }
            if !(task.weight.is_finite() && task.weight >= 0.0) {
                return Err(invalid(format!(
                    "{which}: weight {} must be zero or more",
                    task.weight
                )));
            }
            if !(0.0..=0.9).contains(&task.eval_fraction) {
                return Err(invalid(format!(
                    "{which}: eval_fraction {} must be between 0 and 0.9",
                    task.eval_fraction
                )));
            }
            if task.max_new_tokens == 0 {
                return Err(invalid(format!(
                    "{which}: max_new_tokens must be at least 1"
                )));
            }
            task.sit
                .validate()
                .map_err(|why| invalid(format!("{which}: {why}")))?;
        }
        if let Some(why) = self.training.refusals().first() {
            return Err(invalid(why.to_string()));
        }
        let phases = &self.training.phases;
        if phases
            .difficulty
            .column()
            .is_some_and(|c| c.trim().is_empty())
        {
            return Err(invalid(
                "training.phases: difficulty column:NAME needs a column name".to_string(),
            ));
        }
        if phases.count == 0 || phases.count > 10 {
            return Err(invalid(format!(
                "training.phases: count {} must be between 1 and 10",
                phases.count
            )));
        }
        let lora = &self.training.lora;
        if lora.enabled && (lora.rank == 0 || lora.targets.is_empty()) {
            return Err(invalid(
                "training.lora: rank must be at least 1 and targets must name a module".to_string(),
            ));
        }
        if !(0.0..1.0).contains(&lora.dropout) {
            return Err(invalid(format!(
                "training.lora: dropout {} must be at least 0 and below 1",
                lora.dropout
            )));
        }
        Ok(())
    }

    /// The project as TOML text, with a header comment.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string_pretty(self).unwrap_or_else(|e| {
            // Serialising plain data to TOML only fails on non-finite floats, which validate()
            // refuses; keep the message visible rather than writing a broken file silently.
            format!("# could not write the project: {e}\n")
        });
        format!("# MoI Studio project. Edit freely: paths are relative to this file.\n\n{body}")
    }

    /// Saves the project to `path` atomically. Relative source paths are rewritten against the
    /// new folder when it differs from the one they were relative to.
    pub fn save(&mut self, path: &Path) -> Result<(), ProjectError> {
        self.validate(path)?;
        let new_base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        if let (Ok(old), Ok(new)) = (
            std::path::absolute(&self.base_dir),
            std::path::absolute(&new_base),
        ) && normalize(&old) != normalize(&new)
        {
            let rebase = |p: &mut PathBuf| {
                if p.is_relative() {
                    *p = relative_to(&normalize(&old.join(&*p)), &new);
                }
            };
            for task in &mut self.tasks {
                for source in &mut task.sources {
                    rebase(&mut source.path);
                }
            }
            self.mixing.tokenizer.as_mut().map(rebase);
            self.mixing.tokenizer_config.as_mut().map(rebase);
        }
        self.base_dir = new_base;
        write_atomic(path, self.to_toml().as_bytes()).map_err(|source| ProjectError::Io {
            action: "write",
            path: path.to_path_buf(),
            source,
        })
    }

    /// Where this project's runs go: `runs/` beside the project file, except for the presets
    /// bundled with the studio, whose runs go to the user's data directory
    /// (`$XDG_DATA_HOME/moi-studio/runs/<project>` on Linux) so the install stays untouched.
    pub fn runs_dir(&self) -> PathBuf {
        let data_dir = directories::ProjectDirs::from("", "", "moi-studio")
            .map(|d| d.data_dir().to_path_buf());
        self.runs_dir_in(&bundled_presets_dir(), data_dir.as_deref())
    }

    /// [`Project::runs_dir`] with the presets folder and the user's data directory given.
    pub fn runs_dir_in(&self, presets: &Path, data_dir: Option<&Path>) -> PathBuf {
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => normalize(a) == normalize(b),
        };
        match data_dir {
            Some(data) if same(&self.base_dir, presets) => {
                let slug: String = self
                    .name
                    .chars()
                    .map(|c| {
                        if c.is_alphanumeric() {
                            c.to_ascii_lowercase()
                        } else {
                            '-'
                        }
                    })
                    .collect::<String>()
                    .split('-')
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join("-");
                let slug = if slug.is_empty() {
                    "project".to_string()
                } else {
                    slug
                };
                data.join("runs").join(slug)
            }
            _ => self.base_dir.join("runs"),
        }
    }

    /// A source's path as it is on disk.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            normalize(&self.base_dir.join(path))
        }
    }

    /// The task with this name.
    pub fn task(&self, name: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.name == name)
    }

    /// Import options for a task's source.
    pub fn import_options(source: &Source, source_index: u32) -> ImportOptions {
        ImportOptions {
            format: source.format,
            mapping: source.map.clone(),
            source_index,
            ..ImportOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_bundled_presets_go_to_the_data_directory() {
        let presets = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let mut p = Project {
            name: "Demo: math, code and tool use".into(),
            base_dir: presets.path().to_path_buf(),
            ..Project::default()
        };
        assert_eq!(
            p.runs_dir_in(presets.path(), Some(data.path())),
            data.path().join("runs/demo-math-code-and-tool-use")
        );
        // The user's own projects keep their runs beside them.
        let mine = tempfile::tempdir().unwrap();
        p.base_dir = mine.path().to_path_buf();
        assert_eq!(
            p.runs_dir_in(presets.path(), Some(data.path())),
            mine.path().join("runs")
        );
        // The real presets folder is the source tree's.
        p.base_dir = bundled_presets_dir();
        assert!(!p.runs_dir().starts_with(bundled_presets_dir()));
    }
    use crate::core::import::MapRole;

    fn sample() -> Project {
        let mut math = Task::new("math", "You are a mathematician.");
        math.sources.push(Source::new("data/gsm8k.jsonl"));
        let mut code = Task::new("code", "You are a programmer.");
        code.system_rule = SystemRule::FillIfEmpty;
        code.sources.push(Source {
            path: "data/code.csv".into(),
            format: Some(Format::PromptCompletion),
            map: ColumnMapping::parse_pairs(&["user=question", "assistant=solution"]).unwrap(),
        });
        Project {
            name: "t".into(),
            tasks: vec![math, code],
            ..Project::default()
        }
    }

    #[test]
    fn round_trips_through_toml() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.moi.toml");
        let mut p = sample();
        p.base_dir = dir.path().to_path_buf();
        p.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("system_rule = \"fill_if_empty\""), "{text}");
        assert!(text.contains("user = \"question\""), "{text}");
        let back = Project::load(&path).unwrap();
        assert_eq!(back.tasks, p.tasks);
        assert_eq!(
            back.tasks[1].sources[0].map.get(MapRole::Assistant),
            Some("solution")
        );
    }

    #[test]
    fn save_as_elsewhere_rebases_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = sample();
        p.base_dir = dir.path().join("a");
        let new_path = dir.path().join("b/c/p.moi.toml");
        p.save(&new_path).unwrap();
        let back = Project::load(&new_path).unwrap();
        assert_eq!(
            back.tasks[0].sources[0].path,
            PathBuf::from("../../a/data/gsm8k.jsonl")
        );
        assert_eq!(
            normalize(&back.resolve(&back.tasks[0].sources[0].path)),
            normalize(&dir.path().join("a/data/gsm8k.jsonl"))
        );
    }

    #[test]
    fn unknown_sections_survive_a_save() {
        let text = "name = \"x\"\n[packing]\nmax_seq_len = 2048\n";
        let p = Project::from_toml(text, Path::new("x.toml")).unwrap();
        let out = p.to_toml();
        assert!(
            out.contains("[packing]") && out.contains("max_seq_len = 2048"),
            "{out}"
        );
    }

    #[test]
    fn malformed_file_names_the_line() {
        let text = "name = \"x\"\n\n[[tasks]]\nname = \"math\"\nsystem_prompt = \"unterminated\n";
        let err = Project::from_toml(text, Path::new("demo.moi.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 5"), "{msg}");
        assert!(msg.contains("demo.moi.toml"), "{msg}");
    }

    #[test]
    fn wrong_types_and_values_are_reported() {
        let text = "[[tasks]]\nname = \"m\"\nsystem_prompt = \"s\"\nweight = \"heavy\"\n";
        let msg = Project::from_toml(text, Path::new("p"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("line 4") && msg.contains("weight"), "{msg}");
        let text = "[[tasks]]\nname = \"m\"\nsystem_prompt = \"s\"\neval_fraction = 2.0\n";
        let msg = Project::from_toml(text, Path::new("p"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("eval_fraction 2"), "{msg}");
        let msg = Project::from_toml("[packing]\nmax_seq_len = 4\n", Path::new("p"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("max_seq_len 4 is too small"), "{msg}");
        let msg = Project::from_toml("[mixing]\ntemperature = 0.0\n", Path::new("p"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("temperature 0 must be above zero"), "{msg}");
        let text = "[[tasks]]\nname = \"m\"\nsystem_prompt = \"s\"\n[[tasks]]\nname = \"m\"\nsystem_prompt = \"t\"\n";
        let msg = Project::from_toml(text, Path::new("p"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("same name"), "{msg}");
    }

    #[test]
    fn versions_are_checked() {
        let p = Project::from_toml("name = \"old\"\n", Path::new("p")).unwrap();
        assert_eq!(p.format_version, PROJECT_FORMAT_VERSION);
        assert_eq!(p.default_system_prompt, DEFAULT_SYSTEM_PROMPT);
        let err = Project::from_toml("format_version = 99\n", Path::new("p")).unwrap_err();
        assert!(
            matches!(err, ProjectError::Newer { found: 99, .. }),
            "{err}"
        );
    }
}
