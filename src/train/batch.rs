//! From packed rows to a training batch, and the loss: next-token cross-entropy on trained tokens,
//! averaged over tokens or per sample then over samples (MoI v2's normalisation, so every answer
//! counts as it would unpacked).

use candle_core::backprop::GradStore;
use candle_core::{D, Device, Result, Tensor};

use crate::core::packing::{PackedRow, SegmentKind};
pub use crate::core::train_settings::LossNorm;
use std::sync::Arc;

use crate::train::kernels;
use crate::train::model::{Decoder, Mask, PAD_SEGMENT, attention_mask};

/// Tensors for one step.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids `[b, t]` (padding 0).
    pub input_ids: Tensor,
    /// Position ids `[b, t]`.
    pub positions: Tensor,
    /// The attention mask (segment ids).
    pub mask: Mask,
    /// Next-token targets `[b·(t−1)]` (any id where not trained).
    pub targets: Tensor,
    /// The same targets, for the fused loss.
    pub target_ids: Arc<Vec<u32>>,
    /// Loss weight of each target `[b·(t−1)]`, zero where not trained; sums to one.
    pub weights: Tensor,
    /// Real (non-padding) tokens in the batch.
    pub tokens: usize,
    /// Targets with a non-zero weight.
    pub trained: usize,
    /// The task of each target's sample (`None` where not trained), for per-task losses.
    pub target_tasks: Vec<Option<u32>>,
    /// The trained targets alone, for a loss that computes logits only where it needs them.
    pub trained_only: TrainedTargets,
}

/// The targets with a non-zero weight: where each sits, its token and its weight.
#[derive(Debug, Clone)]
pub struct TrainedTargets {
    /// Index of each into the batch's `b·(t−1)` targets.
    pub at: Vec<usize>,
    /// Row of each in the flattened `[b·t, hidden]` states: the position the target follows.
    pub rows: Tensor,
    /// The target tokens.
    pub ids: Arc<Vec<u32>>,
    /// Their loss weights `[n]`.
    pub weights: Tensor,
}

/// What a whole optimizer step's loss is normalised by: trained targets and samples over every
/// micro-batch of the step, so gradient accumulation gives the loss of one big batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepNorm {
    /// Token mean or per-sample mean.
    pub norm: LossNorm,
    /// Trained targets in the step.
    pub trained: usize,
    /// Samples (instructions with at least one trained target) in the step.
    pub samples: usize,
}

impl StepNorm {
    /// Counts over the rows of every micro-batch of one step.
    pub fn of<'a>(rows: impl IntoIterator<Item = &'a PackedRow>, norm: LossNorm) -> Self {
        let mut trained = 0;
        let mut samples = 0;
        for row in rows {
            for seg in row
                .segments
                .iter()
                .filter(|s| s.kind == SegmentKind::Instruction)
            {
                let n = (seg.tokens.start.max(1) as usize..seg.tokens.end as usize)
                    .filter(|&j| row.labels[j] >= 0)
                    .count();
                trained += n;
                samples += usize::from(n > 0);
            }
        }
        Self {
            norm,
            trained,
            samples,
        }
    }
}

/// Pads `rows` to the longest and builds the batch, its weights summing to one over `rows`.
pub fn make_batch(rows: &[PackedRow], norm: LossNorm, device: &Device) -> Result<Batch> {
    make_step_batch(rows, &StepNorm::of(rows, norm), device)
}

/// Pads `rows` (one micro-batch) to the longest and builds the batch, its weights normalised over
/// the whole step `step` describes: the micro-batches' losses add up to the step's loss.
pub fn make_step_batch(rows: &[PackedRow], step: &StepNorm, device: &Device) -> Result<Batch> {
    let t = rows
        .iter()
        .map(|r| r.input_ids.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let b = rows.len();
    let mut ids = vec![0u32; b * t];
    let mut pos = vec![0u32; b * t];
    let mut segs = vec![vec![PAD_SEGMENT; t]; b];
    let mut targets = vec![0u32; b * (t - 1)];
    let mut weights = vec![0f32; b * (t - 1)];
    // Which sample (row, segment) each trained target belongs to.
    let mut owner: Vec<Option<(usize, usize)>> = vec![None; b * (t - 1)];
    let mut tokens = 0;
    for (r, row) in rows.iter().enumerate() {
        let n = row.input_ids.len();
        tokens += n;
        ids[r * t..r * t + n].copy_from_slice(&row.input_ids);
        pos[r * t..r * t + n].copy_from_slice(&row.position_ids);
        segs[r][..n].copy_from_slice(&row.segment_ids);
        for (s, seg) in row.segments.iter().enumerate() {
            if seg.kind != SegmentKind::Instruction {
                continue;
            }
            for j in seg.tokens.start.max(1) as usize..seg.tokens.end as usize {
                let label = row.labels[j];
                if label >= 0 {
                    let k = r * (t - 1) + j - 1;
                    targets[k] = label as u32;
                    owner[k] = Some((r, s));
                }
            }
        }
    }
    let trained = owner.iter().filter(|o| o.is_some()).count();
    let target_tasks: Vec<Option<u32>> = owner
        .iter()
        .map(|o| o.and_then(|(r, s)| rows[r].segments[s].task))
        .collect();
    match step.norm {
        LossNorm::TokenMean => {
            for (w, o) in weights.iter_mut().zip(&owner) {
                if o.is_some() {
                    *w = 1.0 / step.trained.max(1) as f32;
                }
            }
        }
        LossNorm::SampleMean => {
            let mut counts: std::collections::HashMap<(usize, usize), usize> = Default::default();
            for o in owner.iter().flatten() {
                *counts.entry(*o).or_default() += 1;
            }
            let samples = step.samples.max(1) as f32;
            for (w, o) in weights.iter_mut().zip(&owner) {
                if let Some(key) = o {
                    *w = 1.0 / (counts[key] as f32 * samples);
                }
            }
        }
    }
    let at: Vec<usize> = (0..owner.len()).filter(|&k| owner[k].is_some()).collect();
    let trained_only = TrainedTargets {
        rows: Tensor::from_vec(
            at.iter()
                .map(|&k| kernels::next_token_row(k, t) as u32)
                .collect::<Vec<u32>>(),
            at.len(),
            device,
        )?,
        ids: Arc::new(at.iter().map(|&k| targets[k]).collect()),
        weights: Tensor::from_vec(
            at.iter().map(|&k| weights[k]).collect::<Vec<f32>>(),
            at.len(),
            device,
        )?,
        at,
    };
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        positions: Tensor::from_vec(pos, (b, t), device)?,
        mask: attention_mask(&segs, t, device)?,
        targets: Tensor::from_vec(targets.clone(), b * (t - 1), device)?,
        target_ids: Arc::new(targets),
        weights: Tensor::from_vec(weights, b * (t - 1), device)?,
        tokens,
        trained,
        target_tasks,
        trained_only,
    })
}

/// The weighted next-token loss of `model` on `batch` (a scalar).
pub fn batch_loss(model: &Decoder, batch: &Batch) -> Result<Tensor> {
    Ok(batch_loss_parts(model, batch)?.0)
}

/// The weighted loss (a scalar) and every target's log-probability `[b·(t−1)]`, from which
/// per-task losses are read.
pub fn batch_loss_parts(model: &Decoder, batch: &Batch) -> Result<(Tensor, Tensor)> {
    if model.fused()
        && !batch.trained_only.at.is_empty()
        && let Some(x) = model.hidden_train(&batch.input_ids, &batch.positions, &batch.mask)?
    {
        return loss_of_hidden(model, batch, &x, true);
    }
    let logits = model.forward_train(&batch.input_ids, &batch.positions, &batch.mask)?;
    loss_of_logits(model, batch, &logits)
}

/// One micro-batch's training pass and backward pass (checkpointed per layer when the model
/// is set so): the loss's value, every target's log-probability `[b·(t−1)]` and the trained
/// parameters' gradients.
pub fn batch_backward(model: &Decoder, batch: &Batch) -> Result<(f32, Tensor, GradStore)> {
    let mut parts = None;
    let grads = model.backward(
        &batch.input_ids,
        &batch.positions,
        &batch.mask,
        |hidden, fused| {
            let (loss, log_probs) = loss_of_hidden(model, batch, hidden, fused)?;
            parts = Some((loss.to_scalar::<f32>()?, log_probs));
            Ok(loss)
        },
    )?;
    let (loss, log_probs) =
        parts.ok_or_else(|| candle_core::Error::Msg("the loss was never computed".into()))?;
    Ok((loss, log_probs, grads))
}

/// The loss and log-probabilities from the final hidden states `[b, t, hidden]`.
fn loss_of_hidden(
    model: &Decoder,
    batch: &Batch,
    hidden: &Tensor,
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    let sel = &batch.trained_only;
    if !fused || sel.at.is_empty() {
        return loss_of_logits(model, batch, &model.logits(hidden, fused)?);
    }
    // Only the trained positions go through the vocabulary-sized head: in an instruction
    // batch most tokens are prompts, and their logits would only be thrown away.
    let picked =
        kernels::next_token_log_probs(&model.head_at(hidden, &sel.rows)?, sel.ids.clone())?;
    let loss = (&picked * &sel.weights)?.sum_all()?.neg()?;
    let mut all = vec![0f32; batch.target_ids.len()];
    for (&k, lp) in sel.at.iter().zip(picked.to_vec1::<f32>()?) {
        all[k] = lp;
    }
    let n = all.len();
    Ok((loss, Tensor::from_vec(all, n, model.device())?))
}

/// The loss and log-probabilities from logits `[b, t, vocab]`.
fn loss_of_logits(model: &Decoder, batch: &Batch, logits: &Tensor) -> Result<(Tensor, Tensor)> {
    if model.fused() {
        let picked = kernels::next_token_log_probs(logits, batch.target_ids.clone())?;
        let loss = (&picked * &batch.weights)?.sum_all()?.neg()?;
        return Ok((loss, picked.detach()));
    }
    let (b, t, v) = logits.dims3()?;
    let logits = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs
        .gather(&batch.targets.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    let loss = (&picked * &batch.weights)?.sum_all()?.neg()?;
    Ok((loss, picked.detach()))
}

/// Sums of per-target loss and counts by task, over one step's micro-batches.
#[derive(Debug, Clone, Default)]
pub struct TaskLossSums {
    sums: Vec<(f64, u64)>,
}

impl TaskLossSums {
    /// Adds a micro-batch: `log_probs` are its targets' log-probabilities.
    pub fn add(&mut self, batch: &Batch, log_probs: &[f32]) {
        for (task, lp) in batch.target_tasks.iter().zip(log_probs) {
            if let Some(task) = *task {
                let i = task as usize;
                if self.sums.len() <= i {
                    self.sums.resize(i + 1, (0.0, 0));
                }
                self.sums[i].0 -= f64::from(*lp);
                self.sums[i].1 += 1;
            }
        }
    }

    /// Each task's mean loss, named by `names` (task index order), tasks without tokens left out.
    pub fn means(&self, names: &[String]) -> Vec<crate::core::events::TaskLoss> {
        self.sums
            .iter()
            .enumerate()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(i, (sum, n))| crate::core::events::TaskLoss {
                task: names.get(i).cloned().unwrap_or_else(|| format!("task {i}")),
                loss: sum / *n as f64,
                tokens: *n,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::packing::{IGNORE_INDEX, Segment};

    fn row() -> PackedRow {
        // Two instructions: tokens 0..4 (trained 2..4) and 4..10 (trained 6..10).
        let labels = vec![
            IGNORE_INDEX,
            IGNORE_INDEX,
            12,
            13,
            IGNORE_INDEX,
            IGNORE_INDEX,
            16,
            17,
            18,
            19,
        ];
        let seg = |a: u32, b: u32| Segment {
            kind: SegmentKind::Instruction,
            task: Some(0),
            record: Some(0),
            chunk: 0,
            tokens: a..b,
            system: a..a,
            offset: 0,
            partial: false,
        };
        PackedRow {
            input_ids: (10..20).collect(),
            labels,
            position_ids: (0..10).collect(),
            segment_ids: vec![1, 1, 1, 1, 2, 2, 2, 2, 2, 2],
            segments: vec![seg(0, 4), seg(4, 10)],
        }
    }

    /// The first instruction of [`row`] alone.
    fn short_row() -> PackedRow {
        let mut short = row();
        short.input_ids.truncate(4);
        short.labels.truncate(4);
        short.position_ids.truncate(4);
        short.segment_ids.truncate(4);
        short.segments.truncate(1);
        short
    }

    #[test]
    fn weights_follow_the_normalisation() {
        let dev = Device::Cpu;
        let tok = make_batch(&[row()], LossNorm::TokenMean, &dev).unwrap();
        let w: Vec<f32> = tok.weights.to_vec1().unwrap();
        assert_eq!(tok.trained, 6);
        assert!(
            w.iter()
                .filter(|&&x| x > 0.0)
                .all(|&x| (x - 1.0 / 6.0).abs() < 1e-6)
        );
        // Target at index j−1 predicts token j: token 2 (label 12) is predicted at index 1.
        let targets: Vec<u32> = tok.targets.to_vec1().unwrap();
        assert_eq!(targets[1], 12);
        assert!(w[0] == 0.0 && w[1] > 0.0);
        let per = make_batch(&[row()], LossNorm::SampleMean, &dev).unwrap();
        let w: Vec<f32> = per.weights.to_vec1().unwrap();
        // Sample 1 has 2 trained tokens, sample 2 has 4: weights 1/4 and 1/8.
        assert!(
            (w[1] - 0.25).abs() < 1e-6 && (w[5] - 0.125).abs() < 1e-6,
            "{w:?}"
        );
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    /// A one-layer model small enough for exact comparisons.
    fn small_config() -> crate::train::config::ModelConfig {
        crate::train::config::ModelConfig {
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: Some(1),
            max_position_embeddings: 32,
            ..crate::train::config::ModelConfig::tiny(32)
        }
    }

    #[test]
    fn padding_adds_nothing_to_the_batch() {
        let dev = Device::Cpu;
        let b = make_batch(&[row(), short_row()], LossNorm::TokenMean, &dev).unwrap();
        assert_eq!(b.input_ids.dims(), &[2, 10]);
        assert_eq!(b.tokens, 14);
        assert_eq!(b.trained, 8);
    }

    #[test]
    fn the_fused_loss_on_trained_positions_equals_log_softmax_and_gather_with_gradients() {
        use crate::core::train_settings::Kernels;
        use crate::train::model::new_trainable;
        let dev = Device::Cpu;
        let (mut model, varmap) = new_trainable(&small_config(), 5, &dev).unwrap();
        let b = make_batch(&[row(), short_row()], LossNorm::SampleMean, &dev).unwrap();
        // The fused loss computes logits only at the trained positions.
        assert!(b.trained_only.at.len() < b.target_ids.len());
        let (fused, fused_lp) = batch_loss_parts(&model, &b).unwrap();
        let fused_grads = fused.backward().unwrap();
        model.set_kernels(Kernels::Composite);
        let (comp, comp_lp) = batch_loss_parts(&model, &b).unwrap();
        let comp_grads = comp.backward().unwrap();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            let (f, c) = (
                fused_grads.get(var.as_tensor()),
                comp_grads.get(var.as_tensor()),
            );
            let (Some(f), Some(c)) = (f, c) else {
                panic!("{name}: a gradient is missing");
            };
            let diff = crate::train::kernels::tests::max_diff(f, c);
            assert!(diff < 1e-5, "{name}: gradients differ by {diff}");
        }
        let (fused, comp) = (
            fused.to_scalar::<f32>().unwrap(),
            comp.to_scalar::<f32>().unwrap(),
        );
        assert!((fused - comp).abs() < 1e-5, "{fused} vs {comp}");
        let (a, c) = (
            fused_lp.to_vec1::<f32>().unwrap(),
            comp_lp.to_vec1::<f32>().unwrap(),
        );
        for (w, (x, y)) in b
            .weights
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(a.iter().zip(&c))
        {
            if *w > 0.0 {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn per_task_losses_weighted_by_tokens_average_to_the_step_loss() {
        use crate::train::model::new_trainable;
        let dev = Device::Cpu;
        let config = small_config();
        let (model, _) = new_trainable(&config, 5, &dev).unwrap();
        // The second instruction of each row belongs to task 1; one row is task 0 alone.
        let mut mixed = row();
        mixed.segments[1].task = Some(1);
        let rows = [mixed.clone(), short_row(), mixed];
        let step = StepNorm::of(&rows, LossNorm::TokenMean);
        let mut sums = TaskLossSums::default();
        let mut step_loss = 0f64;
        for micro in rows.chunks(2) {
            let b = make_step_batch(micro, &step, &dev).unwrap();
            let (loss, lp) = batch_loss_parts(&model, &b).unwrap();
            step_loss += f64::from(loss.to_scalar::<f32>().unwrap());
            sums.add(&b, &lp.to_vec1::<f32>().unwrap());
        }
        let names = ["a".to_string(), "b".to_string()];
        let per_task = sums.means(&names);
        assert_eq!(per_task.len(), 2);
        assert_eq!(per_task[0].task, "a");
        // Task 0: 2 trained targets in each of three rows; task 1: 4 in each of two.
        assert_eq!((per_task[0].tokens, per_task[1].tokens), (6, 8));
        let tokens: u64 = per_task.iter().map(|t| t.tokens).sum();
        let weighted: f64 = per_task
            .iter()
            .map(|t| t.loss * t.tokens as f64)
            .sum::<f64>()
            / tokens as f64;
        assert!(
            (weighted - step_loss).abs() < 1e-5,
            "{weighted} vs {step_loss}"
        );
        assert!(
            (per_task[0].loss - per_task[1].loss).abs() > 1e-6,
            "the tasks differ"
        );
    }

    #[test]
    fn accumulated_micro_batches_give_the_loss_and_gradients_of_one_batch() {
        use crate::train::model::{named_vars, new_trainable};
        let dev = Device::Cpu;
        let config = small_config();
        let (model, weights) = new_trainable(&config, 3, &dev).unwrap();
        let vars = named_vars(&weights);
        // Rows of very different sizes: 10 trained tokens against 3.
        let rows = [row(), short_row(), row(), short_row()];
        for norm in [LossNorm::TokenMean, LossNorm::SampleMean] {
            let whole = make_batch(&rows, norm, &dev).unwrap();
            let whole_loss = batch_loss(&model, &whole).unwrap();
            let whole_grads = whole_loss.backward().unwrap();
            let step = StepNorm::of(&rows, norm);
            let mut sum = 0f32;
            let mut grads: Vec<Tensor> = Vec::new();
            for micro in rows.chunks(1) {
                let b = make_step_batch(micro, &step, &dev).unwrap();
                let loss = batch_loss(&model, &b).unwrap();
                sum += loss.to_scalar::<f32>().unwrap();
                let g = loss.backward().unwrap();
                for (i, (_, v)) in vars.iter().enumerate() {
                    let gi = g.get(v.as_tensor()).unwrap().clone();
                    if grads.len() <= i {
                        grads.push(gi);
                    } else {
                        grads[i] = (&grads[i] + gi).unwrap();
                    }
                }
            }
            let want = whole_loss.to_scalar::<f32>().unwrap();
            assert!((sum - want).abs() < 1e-5, "{norm:?}: {sum} vs {want}");
            for ((name, v), g) in vars.iter().zip(&grads) {
                let w = whole_grads.get(v.as_tensor()).unwrap();
                let diff = (g - w)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff < 1e-5, "{norm:?} {name}: gradients differ by {diff}");
            }
        }
    }
}
