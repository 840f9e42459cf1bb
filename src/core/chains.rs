//! Which records become chained instructions (SIT), and what they become: a seeded share of a
//! task's training records, every held-out record for evaluation, chains paired with another
//! task's records of the same split. The same decision for a whole task (training, evaluation)
//! and for one record (the studio's record browser).

use crate::core::dataset::TaskData;
use crate::core::project::Project;
use crate::core::sit::{Composed, SitSettings, compose, exchange};
use crate::core::split::stable_hash;

/// A 64-bit draw for one record, stable across builds.
fn draw(seed: u64, task: &str, index: usize, salt: u64) -> u64 {
    let mut x = seed
        ^ stable_hash(task.as_bytes())
        ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ salt;
    // splitmix64's finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Decides which records of one task and split are composed, and with what.
struct Composer<'a> {
    data: Vec<Option<&'a TaskData>>,
    task: &'a TaskData,
    name: &'a str,
    seed: u64,
    settings: &'a SitSettings,
    eval: bool,
    split: Vec<bool>,
    share: f64,
    /// For each template, the one used instead (itself, or for a chain without second records
    /// the next plain one); `None` when there is none.
    usable: Vec<Option<usize>>,
    /// Second records for chains: every other task's single-exchange records of the split.
    partners: Vec<(usize, Vec<usize>)>,
}

impl<'a> Composer<'a> {
    fn new(
        project: &'a Project,
        data: Vec<Option<&'a TaskData>>,
        task: usize,
        eval: bool,
    ) -> Option<Self> {
        let spec = project.tasks.get(task)?;
        let settings = &spec.sit;
        let share = if eval { 1.0 } else { settings.share };
        if !chains_at(settings, share) {
            return None;
        }
        let split_of = |t: usize| {
            data.get(t)
                .copied()
                .flatten()
                .zip(project.tasks.get(t))
                .map(|(d, tk)| d.eval_split(tk, project.seed).into_owned())
                .unwrap_or_default()
        };
        let partners: Vec<(usize, Vec<usize>)> = (0..project.tasks.len().min(data.len()))
            .filter(|&t| t != task)
            .filter_map(|t| data[t].map(|d| (t, d)))
            .map(|(t, d)| {
                let split = split_of(t);
                let idx = (0..d.records.len())
                    .filter(|&i| split.get(i).copied().unwrap_or(false) == eval)
                    .filter(|&i| exchange(&d.records[i]).is_some())
                    .collect::<Vec<_>>();
                (t, idx)
            })
            .filter(|(_, idx)| !idx.is_empty())
            .collect();
        // The draw picks among all templates, so which record gets which template does not
        // depend on whether chains can be made.
        let n = settings.steps.len();
        let usable: Vec<Option<usize>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|k| (i + k) % n)
                    .find(|&j| !settings.steps[j].is_chain() || !partners.is_empty())
            })
            .collect();
        let this = data.get(task).copied().flatten()?;
        let split = split_of(task);
        Some(Self {
            data,
            task: this,
            name: &spec.name,
            seed: project.seed,
            settings,
            eval,
            split,
            share,
            usable,
            partners,
        })
    }

    /// Record `i` composed, when it is chosen, in this composer's split and a single exchange.
    fn at(&self, i: usize) -> Option<Composed> {
        if self.split.get(i).copied().unwrap_or(false) != self.eval {
            return None;
        }
        let h = draw(self.seed, self.name, i, 0x517);
        let threshold = (self.share * (1u64 << 32) as f64) as u64;
        if self.share < 1.0 && (h & 0xffff_ffff) >= threshold {
            return None;
        }
        let which = self.usable[(h >> 32) as usize % self.usable.len()]?;
        let template = &self.settings.steps[which];
        let partner = if template.is_chain() {
            let p = draw(self.seed, self.name, i, 0xc4a1);
            let (t, idx) = &self.partners[p as usize % self.partners.len()];
            let d = self.data[*t]?;
            Some(&d.records[idx[(p >> 20) as usize % idx.len()]])
        } else {
            None
        };
        compose(self.task.records.get(i)?, template, which, partner)
    }
}

/// Whether a task's SIT settings compose any record at this share.
fn chains_at(settings: &SitSettings, share: f64) -> bool {
    !settings.steps.is_empty() && share > 0.0 && settings.validate().is_ok()
}

/// Whether any training record of task `task` may be composed into a chain: when none is, the
/// task's records can be tokenized one at a time, without the other tasks' records at hand.
pub fn composes_training(project: &Project, task: usize) -> bool {
    project
        .tasks
        .get(task)
        .is_some_and(|t| chains_at(&t.sit, t.sit.share))
}

/// Which records of task `task` are composed, and how: for the training split (`eval` false) a
/// seeded `share` of the single-exchange records; for the held-out split (`eval` true) every one
/// of them. Chains take their second record from another task's records of the same split.
/// Returns `(record index, composed)` in record order.
pub fn compose_task(
    project: &Project,
    data: &[TaskData],
    task: usize,
    eval: bool,
) -> Vec<(usize, Composed)> {
    let Some(c) = Composer::new(project, data.iter().map(Some).collect(), task, eval) else {
        return Vec::new();
    };
    (0..c.task.records.len())
        .filter_map(|i| c.at(i).map(|x| (i, x)))
        .collect()
}

/// What record `index` of task `task` becomes: composed for training (when chosen), or the
/// chained form evaluation asks (a held-out record of a task with templates); `None` otherwise.
/// The same decision [`compose_task`] makes, for one record.
/// Tasks whose data is not loaded yet (`None`) give no second records.
pub fn compose_one(
    project: &Project,
    data: &[Option<&TaskData>],
    task: usize,
    index: usize,
) -> Option<Composed> {
    let spec = project.tasks.get(task)?;
    let this = data.get(task).copied().flatten()?;
    let eval = *this.eval_split(spec, project.seed).get(index)?;
    Composer::new(project, data.to_vec(), task, eval)?.at(index)
}

/// Text the built-in tokenizer should learn from besides the records: every template's words.
pub fn template_text(project: &Project) -> Vec<String> {
    project
        .tasks
        .iter()
        .flat_map(|t| t.sit.steps.iter())
        .map(|s| format!("{}\n{}", s.instruction, s.answer))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::project::Task;
    use crate::core::record::{Origin, Record, Role, Turn};
    use crate::core::sit::default_templates;
    use crate::core::split::eval_mask;

    fn rec(q: &str, a: &str, line: u64) -> Record {
        Record {
            system: None,
            turns: vec![Turn::new(Role::User, q), Turn::new(Role::Assistant, a)],
            origin: Origin { source: 0, line },
            score: None,
        }
    }

    fn data(task: &Task, seed: u64, records: Vec<Record>) -> TaskData {
        let is_eval = eval_mask(records.len(), task.eval_fraction, seed, &task.name);
        TaskData {
            name: task.name.clone(),
            records,
            is_eval,
            split_key: crate::core::dataset::SplitKey::of(task, seed),
            sources: Vec::new(),
        }
    }

    fn project(share: f64) -> (Project, Vec<TaskData>) {
        let mut p = Project::default();
        let mut math = Task::new("math", "You are a mathematician.");
        math.sit = SitSettings {
            share,
            steps: default_templates(),
        };
        let code = Task::new("code", "You are a programmer.");
        let m: Vec<Record> = (0..200)
            .map(|i| {
                rec(
                    &format!("What is {i} plus 1?"),
                    &format!("#### {}", i + 1),
                    i,
                )
            })
            .collect();
        let c: Vec<Record> = (0..50)
            .map(|i| rec(&format!("print({i})"), &format!("{i}"), i))
            .collect();
        let d = vec![data(&math, p.seed, m), data(&code, p.seed, c)];
        p.tasks = vec![math, code];
        (p, d)
    }

    #[test]
    fn a_seeded_share_of_training_records_is_composed_and_every_held_out_one_for_eval() {
        let (p, d) = project(0.3);
        let train = compose_task(&p, &d, 0, false);
        let split = d[0].eval_split(&p.tasks[0], p.seed);
        let n_train = split.iter().filter(|e| !**e).count();
        let share = train.len() as f64 / n_train as f64;
        assert!((0.2..0.4).contains(&share), "{share}");
        assert!(train.iter().all(|(i, _)| !split[*i]));
        assert_eq!(train, compose_task(&p, &d, 0, false), "deterministic");
        // Every template is used, chains pair with the other task's records of the same split.
        for k in 0..4 {
            assert!(train.iter().any(|(_, c)| c.template == k), "template {k}");
        }
        let code_split = d[1].eval_split(&p.tasks[1], p.seed);
        for (_, c) in train.iter().filter(|(_, c)| c.template == 3) {
            let then = c.record.turns[0].content.split("Then: ").nth(1).unwrap();
            let j = d[1]
                .records
                .iter()
                .position(|r| r.turns[0].content == then)
                .unwrap();
            assert!(!code_split[j]);
        }
        let eval = compose_task(&p, &d, 0, true);
        assert_eq!(eval.len(), split.iter().filter(|e| **e).count());
        // One record at a time decides the same.
        for i in 0..d[0].records.len() {
            let loaded: Vec<Option<&TaskData>> = d.iter().map(Some).collect();
            let one = compose_one(&p, &loaded, 0, i);
            let from_all = train
                .iter()
                .chain(&eval)
                .find(|(j, _)| *j == i)
                .map(|(_, c)| c);
            assert_eq!(one.as_ref(), from_all, "record {i}");
        }
        // No templates, or a task without settings: nothing.
        assert!(compose_task(&p, &d, 1, false).is_empty());
        let (none, d) = project(0.0);
        assert!(compose_task(&none, &d, 0, false).is_empty());
        assert_eq!(compose_task(&none, &d, 0, true).len(), eval.len());
    }
}
