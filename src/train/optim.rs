//! AdamW with decoupled weight decay and state that can be saved and restored exactly (candle's
//! own AdamW keeps its moments private), global-norm gradient clipping, and learning-rate
//! schedules.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

pub use crate::core::train_settings::{AdamWConfig, Decay};

/// AdamW over named parameters.
pub struct AdamW {
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken.
    pub steps: u64,
    config: AdamWConfig,
}

/// Whether weight decay applies to a parameter (not to norms and biases, as usual).
fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

impl AdamW {
    /// An optimizer over `params` (name, variable), moments at zero.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let zeros = |p: &(String, Var)| p.1.as_tensor().zeros_like();
        let m = params.iter().map(zeros).collect::<Result<Vec<_>>>()?;
        let v = params.iter().map(zeros).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            m,
            v,
            steps: 0,
            config,
        })
    }

    /// The parameters, by name.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (i, (name, var)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bias1)? / ((&v / bias2)?.sqrt()? + c.eps)?)?;
            let mut theta = var.as_tensor().clone();
            if c.weight_decay > 0.0 && decays(name) {
                theta = (theta * (1.0 - lr * c.weight_decay))?;
            }
            var.set(&(theta - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments, named `m.<param>` and `v.<param>`, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.params.len() * 2);
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("m.{name}"), self.m[i].clone()));
            out.push((format!("v.{name}"), self.v[i].clone()));
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] and the step count.
    pub fn load_state(
        &mut self,
        state: &std::collections::HashMap<String, Tensor>,
        steps: u64,
    ) -> Result<()> {
        for (i, (name, _)) in self.params.iter().enumerate() {
            let get = |k: String| {
                state
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks {k}")))
            };
            self.m[i] = get(format!("m.{name}"))?.to_device(self.m[i].device())?;
            self.v[i] = get(format!("v.{name}"))?.to_device(self.v[i].device())?;
        }
        self.steps = steps;
        Ok(())
    }
}

/// Adds the gradients of `vars` from one backward pass into `acc`, detached, and drops the
/// rest of `grads`. Candle's gradients of matmul operands still point into the forward graph
/// (they are built from its tensors), so a kept `GradStore` would keep that whole graph, every
/// activation of the micro-batch, alive; the detached sums keep nothing but themselves.
pub fn accumulate_grads(acc: &mut GradStore, grads: GradStore, vars: &[Var]) -> Result<()> {
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let sum = match acc.get(v.as_tensor()) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            acc.insert(v.as_tensor(), sum.detach());
        }
    }
    Ok(())
}

/// Scales the gradients of `vars` so their global L2 norm is at most `max_norm` (when positive).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            total += f64::from(
                g.sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_scalar::<f32>()?,
            );
        }
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for var in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let scaled = (g * scale)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// The learning rate at `step` (from 0) of `total`: linear warm-up over `warmup` steps to `peak`,
/// then `decay` down to `peak * floor`.
pub fn lr_at(step: u64, total: u64, warmup: u64, peak: f64, decay: Decay, floor: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup.min(step)) as f64 / span).clamp(0.0, 1.0);
    let low = peak * floor;
    match decay {
        Decay::Constant => peak,
        Decay::Linear => peak - (peak - low) * progress,
        Decay::Cosine => low + (peak - low) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn adamw_minimises_a_quadratic_and_restores_exactly() {
        let dev = Device::Cpu;
        let run = |steps: usize, resume_at: Option<usize>| -> Vec<f32> {
            let w = Var::from_tensor(&Tensor::new(&[3.0f32, -2.0], &dev).unwrap()).unwrap();
            let mut opt =
                AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
            for s in 0..steps {
                if Some(s) == resume_at {
                    // Save, rebuild, restore: the next steps must be identical.
                    let state: std::collections::HashMap<_, _> = opt.state().into_iter().collect();
                    let steps_done = opt.steps;
                    opt =
                        AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
                    opt.load_state(&state, steps_done).unwrap();
                }
                let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
                let grads = loss.backward().unwrap();
                opt.step(&grads, 0.1).unwrap();
            }
            w.as_tensor().to_vec1().unwrap()
        };
        let straight = run(200, None);
        assert!(straight.iter().all(|x| x.abs() < 0.05), "{straight:?}");
        assert_eq!(straight, run(200, Some(77)));
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[3.0f32], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[4.0f32], &dev).unwrap()).unwrap();
        // d/dx of x² is 2x: gradients 6 and 8, norm 10.
        let loss = (a.as_tensor().sqr().unwrap() + b.as_tensor().sqr().unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let mut grads = loss.backward().unwrap();
        let norm = clip_grad_norm(&mut grads, &[a.clone(), b.clone()], 1.0).unwrap();
        assert!((norm - 10.0).abs() < 1e-4);
        let ga: f32 = grads
            .get(a.as_tensor())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((ga - 0.6).abs() < 1e-4, "{ga}");
    }

    #[test]
    fn schedules_warm_up_then_decay() {
        assert!((lr_at(0, 100, 10, 1.0, Decay::Cosine, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 10, 1.0, Decay::Cosine, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, Decay::Cosine, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(100, 100, 10, 1.0, Decay::Cosine, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0, Decay::Linear, 0.0) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(70, 100, 10, 2.0, Decay::Constant, 0.0), 2.0);
    }
}
