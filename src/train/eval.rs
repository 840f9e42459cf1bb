//! Per-task evaluation, the paper's core measurement: every task's held-out records scored under
//! the task's own system prompt and under the default one — mean loss on answer tokens,
//! perplexity, token accuracy — and, for tasks with an answer check, exact match of greedy
//! answers.

use candle_core::{D, DType, Tensor};
use tokenizers::Tokenizer;

use crate::core::chains::compose_task;
use crate::core::dataset::TaskData;
use crate::core::eval::AnswerCheck;
use crate::core::events::{EvalMetrics, PromptKind};
use crate::core::packing::{IGNORE_INDEX, SampleTokens};
use crate::core::project::Project;
use crate::core::record::{Role, SystemRule};
use crate::core::sit::{Composed, every_step_done};
use crate::core::template::{ChatMessage, ChatTemplate};
use crate::core::tokenize::{LabelOptions, conversation, tokenize_messages};
use crate::train::model::{Decoder, attention_mask};

/// One held-out record under one prompt kind.
#[derive(Debug, Clone)]
pub struct EvalItem {
    /// The whole conversation with answer labels (cut to the model's context).
    pub tokens: SampleTokens,
    /// The conversation up to its last answer, with the generation prompt.
    pub prompt: Vec<u32>,
    /// The last answer's text.
    pub reference: String,
}

/// A held-out record asked as a chained instruction (SeqEval), under one prompt kind.
#[derive(Debug, Clone)]
pub struct StepItem {
    /// The chained request with the generation prompt.
    pub prompt: Vec<u32>,
    /// The parts the answer must hold, in order.
    pub parts: Vec<String>,
    /// Longest answer: the reference's length with room.
    pub max_new_tokens: usize,
}

/// A task's held-out items under both prompt kinds.
#[derive(Debug, Clone)]
pub struct EvalTask {
    /// The task's name.
    pub name: String,
    /// Its answer check.
    pub check: AnswerCheck,
    /// Longest generated answer.
    pub max_new_tokens: usize,
    /// Items under the task's prompt, then under the default prompt.
    pub items: [Vec<EvalItem>; 2],
    /// Chained-instruction items (tasks with step templates), in the same order.
    pub steps: [Vec<StepItem>; 2],
}

/// Everything evaluation needs, built once per run.
#[derive(Debug, Clone)]
pub struct EvalSet {
    /// Tasks with held-out records.
    pub tasks: Vec<EvalTask>,
    /// Token ids that end a generated answer.
    pub stop: Vec<u32>,
    /// How many items per task are answered by generation.
    pub generate: usize,
    /// Tokens (rows × padded length) one scoring forward pass may take: the trainer sets it to
    /// a training micro-batch's, so evaluation stays inside the memory the run was planned for.
    pub batch_tokens: usize,
    tokenizer: Tokenizer,
}

/// Which prompt kinds, in the order of [`EvalTask::items`].
pub const PROMPT_KINDS: [PromptKind; 2] = [PromptKind::Task, PromptKind::Default];

impl EvalSet {
    /// Tokenizes up to `max_items` held-out records per task, under each prompt kind. Records
    /// without an assistant turn, or that fail to render, are left out.
    pub fn build(
        project: &Project,
        data: &[TaskData],
        tokenizer: &Tokenizer,
        template: &ChatTemplate,
        max_items: usize,
        generate: usize,
        max_len: usize,
    ) -> Self {
        let mut tasks = Vec::new();
        for (ti, (task, d)) in project.tasks.iter().zip(data).enumerate() {
            let mut items: [Vec<EvalItem>; 2] = [Vec::new(), Vec::new()];
            let mut steps: [Vec<StepItem>; 2] = [Vec::new(), Vec::new()];
            if generate > 0 {
                // The first `generate` chained records that fit the model's context under both
                // prompt kinds.
                for (_, composed) in compose_task(project, data, ti, true) {
                    if steps[0].len() >= generate {
                        break;
                    }
                    let both: Option<Vec<StepItem>> = PROMPT_KINDS
                        .iter()
                        .map(|kind| {
                            step_item(
                                tokenizer, template, project, task, *kind, &composed, max_len,
                            )
                        })
                        .collect();
                    if let Some(both) = both {
                        for (item, out) in both.into_iter().zip(steps.iter_mut()) {
                            out.push(item);
                        }
                    }
                }
            }
            for record in d
                .eval_records_for(task, project.seed)
                .into_iter()
                .take(max_items)
            {
                let Some(last) = record.turns.iter().rposition(|t| t.role == Role::Assistant)
                else {
                    continue;
                };
                let reference = record.turns[last].content.clone();
                for (kind, out) in PROMPT_KINDS.iter().zip(items.iter_mut()) {
                    let mut messages = match kind {
                        PromptKind::Task => {
                            conversation(record, &task.system_prompt, task.system_rule)
                        }
                        PromptKind::Default => conversation(
                            record,
                            &project.default_system_prompt,
                            SystemRule::Replace,
                        ),
                    };
                    // Score the conversation up to and including its last answer.
                    let keep = messages.len() - (record.turns.len() - last - 1);
                    messages.truncate(keep);
                    if let Some(item) =
                        eval_item(tokenizer, template, &messages, reference.clone(), max_len)
                    {
                        out.push(item);
                    }
                }
            }
            if items.iter().any(|i| !i.is_empty()) {
                tasks.push(EvalTask {
                    name: task.name.clone(),
                    check: task.answer_check,
                    max_new_tokens: task.max_new_tokens,
                    items,
                    steps,
                });
            }
        }
        let mut stop: Vec<u32> = [&template.end_of_turn, &template.eos_token]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t.trim()))
            .collect();
        stop.dedup();
        Self {
            tasks,
            stop,
            generate,
            batch_tokens: max_len.max(2),
            tokenizer: tokenizer.clone(),
        }
    }

    /// Held-out items in all, both prompt kinds.
    pub fn len(&self) -> usize {
        self.tasks
            .iter()
            .map(|t| t.items[0].len() + t.items[1].len())
            .sum()
    }

    /// Whether there is nothing to evaluate.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A composed held-out record as a generation prompt under `kind`, with its step check.
fn step_item(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    project: &Project,
    task: &crate::core::project::Task,
    kind: PromptKind,
    composed: &Composed,
    max_len: usize,
) -> Option<StepItem> {
    let mut messages = match kind {
        PromptKind::Task => conversation(&composed.record, &task.system_prompt, task.system_rule),
        PromptKind::Default => conversation(
            &composed.record,
            &project.default_system_prompt,
            SystemRule::Replace,
        ),
    };
    let answer = messages.pop()?;
    let text = template.render(&messages, true).ok()?;
    let prompt = tokenizer.encode(text, false).ok()?.get_ids().to_vec();
    let answer_tokens = tokenizer.encode(answer.content, false).ok()?.len();
    let max_new_tokens = answer_tokens + answer_tokens / 4 + 4;
    (prompt.len() + max_new_tokens <= max_len).then_some(StepItem {
        prompt,
        parts: composed.parts.clone(),
        max_new_tokens,
    })
}

fn eval_item(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[ChatMessage],
    reference: String,
    max_len: usize,
) -> Option<EvalItem> {
    let mut tokens =
        tokenize_messages(tokenizer, template, messages, LabelOptions::default()).ok()?;
    tokens.input_ids.truncate(max_len);
    tokens.labels.truncate(max_len);
    if !tokens.labels.iter().any(|&l| l != IGNORE_INDEX) {
        return None;
    }
    let text = template
        .render(&messages[..messages.len() - 1], true)
        .ok()?;
    let prompt = tokenizer.encode(text, false).ok()?.get_ids().to_vec();
    Some(EvalItem {
        tokens,
        prompt,
        reference,
    })
}

/// Summed loss, tokens and correct tokens of `items`, a few at a time.
fn score_items(
    model: &Decoder,
    items: &[EvalItem],
    budget: usize,
) -> candle_core::Result<(f64, u64, u64)> {
    let samples: Vec<&SampleTokens> = items.iter().map(|i| &i.tokens).collect();
    let per = score_samples(model, &samples, budget)?;
    Ok(per.iter().fold((0.0, 0, 0), |(l, t, c), s| {
        (l + s.loss_sum, t + s.tokens, c + s.correct)
    }))
}

/// One sample's summed answer-token loss, answer tokens and tokens predicted exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SampleScore {
    /// Summed next-token loss over the answer tokens.
    pub loss_sum: f64,
    /// Answer tokens.
    pub tokens: u64,
    /// Answer tokens the greedy prediction got right.
    pub correct: u64,
}

impl SampleScore {
    /// Mean loss per answer token (0 without answer tokens).
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.tokens.max(1) as f64
    }
}

/// Scores every sample on its own (no packing), a few at a time within `budget` tokens per
/// forward pass; forward only, nothing kept for a backward pass.
pub fn score_samples(
    model: &Decoder,
    samples: &[&SampleTokens],
    budget: usize,
) -> candle_core::Result<Vec<SampleScore>> {
    let device = model.device().clone();
    let mut out = Vec::with_capacity(samples.len());
    for chunk in token_batches(samples, budget) {
        let t = chunk
            .iter()
            .map(|i| i.input_ids.len())
            .max()
            .unwrap_or(0)
            .max(2);
        let b = chunk.len();
        let mut ids = vec![0u32; b * t];
        let mut pos = vec![0u32; b * t];
        let mut segs = vec![vec![crate::train::model::PAD_SEGMENT; t]; b];
        let mut targets = vec![0u32; b * (t - 1)];
        let mut weights = vec![0f32; b * (t - 1)];
        for (r, item) in chunk.iter().enumerate() {
            let n = item.input_ids.len();
            ids[r * t..r * t + n].copy_from_slice(&item.input_ids);
            for (j, p) in pos[r * t..r * t + n].iter_mut().enumerate() {
                *p = j as u32;
            }
            segs[r][..n].fill(1);
            for j in 1..n {
                let label = item.labels[j];
                if label != IGNORE_INDEX {
                    targets[r * (t - 1) + j - 1] = label as u32;
                    weights[r * (t - 1) + j - 1] = 1.0;
                }
            }
        }
        let mut scores = vec![SampleScore::default(); b];
        // Logits only where an answer token is scored: the head is the costliest layer of a
        // small model, and most of an eval item is its prompt.
        let at: Vec<usize> = (0..weights.len()).filter(|&k| weights[k] > 0.0).collect();
        let n = at.len();
        if n > 0 {
            let input = Tensor::from_vec(ids, (b, t), &device)?;
            let positions = Tensor::from_vec(pos, (b, t), &device)?;
            let mask = attention_mask(&segs, t, &device)?;
            let rows: Vec<u32> = at
                .iter()
                .map(|&k| crate::train::kernels::next_token_row(k, t) as u32)
                .collect();
            let picked_targets: Vec<u32> = at.iter().map(|&k| targets[k]).collect();
            let hidden = model.hidden(&input, &positions, &mask)?.detach();
            let logits = model
                .head_at(&hidden, &Tensor::from_vec(rows, n, &device)?)?
                .detach();
            let targets = Tensor::from_vec(picked_targets.clone(), n, &device)?;
            let picked = if model.fused() {
                crate::train::kernels::next_token_log_probs(
                    &logits,
                    std::sync::Arc::new(picked_targets),
                )?
            } else {
                candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?
                    .gather(&targets.unsqueeze(1)?, 1)?
                    .squeeze(1)?
            };
            let picked = picked.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let hits = logits
                .argmax(D::Minus1)?
                .eq(&targets)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            for ((&k, lp), hit) in at.iter().zip(&picked).zip(&hits) {
                let s = &mut scores[k / (t - 1)];
                s.loss_sum -= f64::from(*lp);
                s.tokens += 1;
                s.correct += u64::from(*hit > 0.5);
            }
        }
        out.extend(scores);
    }
    Ok(out)
}

/// Consecutive runs of `items` whose rows, padded to the longest, hold at most `budget` tokens
/// (one item at least).
fn token_batches<'a, 'b>(
    items: &'a [&'b SampleTokens],
    budget: usize,
) -> Vec<&'a [&'b SampleTokens]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < items.len() {
        let mut end = start + 1;
        let mut longest = items[start].input_ids.len();
        while end < items.len() {
            let l = longest.max(items[end].input_ids.len());
            if l * (end + 1 - start) > budget {
                break;
            }
            longest = l;
            end += 1;
        }
        out.push(&items[start..end]);
        start = end;
    }
    out
}

/// Greedy answers to the first `n` items; the share that pass `check`.
fn exact_match(
    model: &Decoder,
    set: &EvalSet,
    items: &[EvalItem],
    check: AnswerCheck,
    max_new: usize,
) -> candle_core::Result<Option<(f64, usize, String)>> {
    if check.is_none() || set.generate == 0 {
        return Ok(None);
    }
    let limit = model.config.max_position_embeddings;
    let (mut passed, mut tried) = (0usize, 0usize);
    let mut first = String::new();
    for item in items.iter().take(set.generate) {
        if item.prompt.is_empty() || item.prompt.len() >= limit {
            continue;
        }
        let out = model.generate(&item.prompt, max_new, &set.stop, 0.0, 0)?;
        let text = set.tokenizer.decode(&out, true).unwrap_or_default();
        if tried == 0 {
            first = text.clone();
        }
        tried += 1;
        if check.passes(&text, &item.reference) == Some(true) {
            passed += 1;
        }
    }
    Ok((tried > 0).then(|| (passed as f64 / tried as f64, tried, first)))
}

/// Greedy answers to the chained items; the share with every step done.
fn steps_done(
    model: &Decoder,
    set: &EvalSet,
    items: &[StepItem],
) -> candle_core::Result<Option<(f64, usize)>> {
    let mut passed = 0usize;
    for item in items {
        let out = model.generate(&item.prompt, item.max_new_tokens, &set.stop, 0.0, 0)?;
        let text = set.tokenizer.decode(&out, true).unwrap_or_default();
        if every_step_done(&text, &item.parts) {
            passed += 1;
        }
    }
    Ok((!items.is_empty()).then(|| (passed as f64 / items.len() as f64, items.len())))
}

/// Evaluates every task under both prompt kinds at `step`. `keep_going` is asked between
/// tasks; when it says no, the results so far are returned.
pub fn evaluate(
    model: &Decoder,
    set: &EvalSet,
    step: u64,
    keep_going: &mut dyn FnMut() -> bool,
) -> candle_core::Result<Vec<EvalMetrics>> {
    let mut out = Vec::new();
    for task in &set.tasks {
        if !keep_going() {
            break;
        }
        for ((kind, items), chained) in PROMPT_KINDS.iter().zip(&task.items).zip(&task.steps) {
            if items.is_empty() {
                continue;
            }
            let (loss_sum, tokens, correct) = score_items(model, items, set.batch_tokens)?;
            let loss = loss_sum / tokens.max(1) as f64;
            let em = exact_match(model, set, items, task.check, task.max_new_tokens)?;
            let steps = steps_done(model, set, chained)?;
            out.push(EvalMetrics {
                step,
                task: task.name.clone(),
                prompt: *kind,
                loss,
                perplexity: loss.exp(),
                accuracy: correct as f64 / tokens.max(1) as f64,
                exact_match: em.as_ref().map(|(share, _, _)| *share),
                items: items.len(),
                generated: em.as_ref().map_or(0, |(_, n, _)| *n),
                tokens,
                sample: em.map(|(_, _, text)| text),
                steps_done: steps.map(|(share, _)| share),
                steps_tried: steps.map_or(0, |(_, n)| n),
            });
        }
    }
    Ok(out)
}

/// The number early stopping watches: the mean loss over tasks under the default prompt (the
/// prompt the model is used with), or under the task prompts when no task has default items.
pub fn watched_loss(results: &[EvalMetrics]) -> Option<f64> {
    let mean = |kind: PromptKind| {
        let v: Vec<f64> = results
            .iter()
            .filter(|m| m.prompt == kind && m.loss.is_finite())
            .map(|m| m.loss)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    mean(PromptKind::Default).or_else(|| mean(PromptKind::Task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::ModelConfig;
    use crate::train::model::new_trainable;

    fn item(len: usize, seed: u32) -> EvalItem {
        let input_ids: Vec<u32> = (0..len as u32).map(|i| (i * 7 + seed) % 50).collect();
        // The second half is the answer.
        let labels = input_ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if i >= len / 2 {
                    id as i32
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        EvalItem {
            tokens: SampleTokens {
                input_ids,
                labels,
                system: 0..0,
            },
            prompt: Vec::new(),
            reference: String::new(),
        }
    }

    #[test]
    fn scores_do_not_depend_on_batching_or_padding() {
        let cfg = ModelConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 1,
            max_position_embeddings: 64,
            ..ModelConfig::tiny(50)
        };
        let (model, _) = new_trainable(&cfg, 3, &candle_core::Device::Cpu).unwrap();
        let items: Vec<EvalItem> = [5, 17, 9, 30, 12]
            .iter()
            .zip(1..)
            .map(|(&n, s)| item(n, s))
            .collect();
        let (loss, tokens, correct) = score_items(&model, &items, 4096).unwrap();
        let (mut l1, mut t1, mut c1) = (0.0, 0, 0);
        for it in &items {
            let (l, t, c) = score_items(&model, std::slice::from_ref(it), 4096).unwrap();
            l1 += l;
            t1 += t;
            c1 += c;
        }
        assert_eq!((tokens, correct), (t1, c1));
        // Answers of 3 + 9 + 5 + 15 + 6 tokens (the first answer token of each is predicted from
        // the prompt, so all of them count).
        assert_eq!(tokens, 38);
        assert!((loss - l1).abs() < 1e-3, "{loss} vs {l1}");
        // An untrained model over 50 tokens: about ln 50 per token.
        let mean = loss / tokens as f64;
        assert!((mean - 50f64.ln()).abs() < 1.0, "{mean}");
    }

    #[test]
    fn watched_loss_prefers_the_default_prompt() {
        let m = |task: &str, prompt, loss| EvalMetrics {
            step: 1,
            task: task.into(),
            prompt,
            loss,
            perplexity: f64::exp(loss),
            accuracy: 0.0,
            exact_match: None,
            items: 1,
            generated: 0,
            tokens: 1,
            sample: None,
            steps_done: None,
            steps_tried: 0,
        };
        let results = [
            m("a", PromptKind::Task, 1.0),
            m("a", PromptKind::Default, 2.0),
            m("b", PromptKind::Default, 4.0),
        ];
        assert_eq!(watched_loss(&results), Some(3.0));
        assert_eq!(watched_loss(&results[..1]), Some(1.0));
        assert_eq!(watched_loss(&[]), None);
    }
}
