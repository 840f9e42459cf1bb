//! A trainable Llama-family decoder (Llama 2/3, SmolLM, Qwen2, Mistral) built only from candle
//! ops that have a backward pass: RMSNorm written out, rotary embeddings as rotate-half with
//! broadcast multiplies, attention as matmul + additive mask + `candle_nn::ops::softmax`.
//! (candle's fused `rms_norm`, `rope*` and `softmax_last_dim` have no backward and would train
//! nothing.)
//!
//! By default the forward pass on the CPU in f32 runs the fused kernels of
//! [`crate::train::kernels`] instead (same results, gradients included); the composite form stays
//! behind [`Kernels::Composite`], runs on other devices and dtypes, and serves generation with a
//! KV cache.

use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor, Var};
use candle_nn::{Embedding, Linear, VarBuilder, VarMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::core::train_settings::{Kernels, LoraSettings, LoraTarget};
use crate::train::config::ModelConfig;
use crate::train::kernels::{self, RopeTables};

/// Segment id of padding: never attended to.
pub const PAD_SEGMENT: u32 = u32::MAX;

/// RMSNorm in differentiable ops: x · rsqrt(mean(x²) + eps) · w, computed in f32.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if fused {
            return kernels::rms_norm(x, &self.weight, self.eps);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let norm = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        x.broadcast_div(&norm)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)
    }
}

/// Rotary tables: cos and sin for every position, over the whole head (`[max_pos, head]`).
#[derive(Debug, Clone)]
struct Rotary {
    cos: Tensor,
    sin: Tensor,
    /// The same tables for the fused kernel (f32 on the CPU only).
    tables: Option<Arc<RopeTables>>,
}

impl Rotary {
    fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let head = cfg.head_size();
        let half = head / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let f = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / head as f64);
                cfg.llama3_rope.map_or(f, |r| r.scale(f)) as f32
            })
            .collect();
        let positions = cfg.max_position_embeddings;
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let t = Tensor::arange(0u32, positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?;
        let freqs = t.broadcast_mul(&inv_freq)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        let (cos, sin) = (emb.cos()?, emb.sin()?);
        let tables = if device.is_cpu() && dtype == DType::F32 {
            Some(Arc::new(RopeTables::new(&cos, &sin)?))
        } else {
            None
        };
        Ok(Self {
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
            tables,
        })
    }

    /// Applies the rotation to `x` of shape `[b, heads, t, head]` at `positions` `[b, t]`.
    fn apply(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (b, _, t, d) = x.dims4()?;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, 1, t, d))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, 1, t, d))?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// Keys and values of earlier positions, for generation.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The source of LoRA dropout masks: seeded, so a run (and its resume) draws the same masks.
/// The trainer sets the seed before each micro-batch; each adapter call then takes the next
/// stream, in the fixed order the layers run.
#[derive(Debug, Default)]
pub struct DropoutRng {
    seed: AtomicU64,
    calls: AtomicU64,
}

impl DropoutRng {
    /// Which of `n` elements the next call keeps (drawn with probability 1 − p each).
    fn keep(&self, n: usize, p: f32) -> Vec<bool> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let seed = self.seed.load(Ordering::Relaxed) ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() >= p).collect()
    }

    /// A keep-mask scaled by 1 / (1 − p), shaped like `x`.
    fn mask(&self, x: &Tensor, p: f32) -> Result<Tensor> {
        let scale = 1.0 / (1.0 - p);
        let values: Vec<f32> = self
            .keep(x.elem_count(), p)
            .into_iter()
            .map(|k| if k { scale } else { 0.0 })
            .collect();
        Tensor::from_vec(values, x.dims(), x.device())?.to_dtype(x.dtype())
    }
}

/// A low-rank adapter on a linear layer: adds `scale · B A dropout(x)`.
#[derive(Debug, Clone)]
struct LoraAdapter {
    /// `[rank, in]`.
    a: Tensor,
    /// `[out, rank]`.
    b: Tensor,
    scale: f64,
    dropout: f32,
    rng: Arc<DropoutRng>,
}

/// A linear layer, optionally with a LoRA adapter.
#[derive(Debug, Clone)]
struct Proj {
    base: Linear,
    lora: Option<LoraAdapter>,
}

impl Proj {
    fn forward(&self, x: &Tensor, train: bool, fused: bool) -> Result<Tensor> {
        if fused {
            return self.forward_flat(x, train);
        }
        let y = self.base.forward(x)?;
        let Some(l) = &self.lora else {
            return Ok(y);
        };
        let x = if train && l.dropout > 0.0 {
            (x * l.rng.mask(x, l.dropout)?)?
        } else {
            x.clone()
        };
        let update = x.broadcast_matmul(&l.a.t()?)?.broadcast_matmul(&l.b.t()?)?;
        y + (update * l.scale)?
    }

    /// The fused path: one 2-D matmul over every token (no weight broadcast over the batch and
    /// no batched weight gradient to sum), and a frozen weight's gradient never computed.
    fn forward_flat(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (x2, lead) = flat_tokens(x)?;
        let w = self.base.weight();
        let dropout = |l: &LoraAdapter| {
            (train && l.dropout > 0.0).then(|| l.rng.keep(x2.elem_count(), l.dropout))
        };
        let mut y = match (&self.lora, w.is_variable()) {
            // A frozen base with its adapter: one op, no weight gradient, no intermediates.
            (Some(l), false) => kernels::lora_linear(
                &x2,
                w,
                (&l.a, &l.b, l.scale),
                dropout(l).map(|keep| (keep, l.dropout)),
            )?,
            (Some(l), true) => {
                let xd = match dropout(l) {
                    Some(keep) => kernels::dropout(&x2, keep, l.dropout)?,
                    None => x2.clone(),
                };
                let update = xd.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?;
                (x2.matmul(&w.t()?)? + (update * l.scale)?)?
            }
            (None, true) => kernels::trained_linear(&x2, w)?,
            (None, false) => kernels::frozen_linear(&x2, w)?,
        };
        if let Some(bias) = self.base.bias() {
            y = y.broadcast_add(bias)?;
        }
        unflat_tokens(y, &lead)
    }

    /// The weight when this projection is a plain one (no adapter, no bias) — what
    /// [`kernels::gated_up`] takes.
    fn plain_weight(&self) -> Option<&Tensor> {
        (self.lora.is_none() && self.base.bias().is_none()).then(|| self.base.weight())
    }
}

/// `x` as the fused path's `[tokens, features]`, and the dims before its last, to give the
/// result its shape back. A 2-D input is used as it is: every reshape is one more gradient for
/// candle's backward pass to add.
fn flat_tokens(x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
    let dims = x.dims();
    let lead = dims[..dims.len().saturating_sub(1)].to_vec();
    let flat = if dims.len() == 2 {
        x.clone()
    } else {
        x.reshape(((), *dims.last().unwrap_or(&0)))?
    };
    Ok((flat, lead))
}

/// `y` (`[tokens, features]`) back in the leading dims [`flat_tokens`] took off.
fn unflat_tokens(y: Tensor, lead: &[usize]) -> Result<Tensor> {
    if lead.len() <= 1 {
        return Ok(y);
    }
    let mut dims = lead.to_vec();
    dims.push(y.dim(1)?);
    y.reshape(dims)
}

/// Where LoRA adapters come from while a decoder is built.
#[derive(Clone)]
struct LoraSource<'a> {
    settings: &'a LoraSettings,
    vb: VarBuilder<'a>,
    rng: Arc<DropoutRng>,
}

/// Builds a linear layer named by `vb`'s prefix; it gets an adapter when `lora` targets it.
fn linear(
    inp: usize,
    out: usize,
    bias: bool,
    vb: VarBuilder,
    target: LoraTarget,
    lora: Option<&LoraSource>,
) -> Result<Proj> {
    let weight = vb.get((out, inp), "weight")?;
    let bias = if bias {
        Some(vb.get(out, "bias")?)
    } else {
        None
    };
    let lora = match lora {
        Some(src) if src.settings.targets.contains(&target) => {
            let lb = src.vb.pp(vb.prefix());
            let r = src.settings.rank;
            Some(LoraAdapter {
                a: lb.get((r, inp), "lora_A.weight")?,
                b: lb.get((out, r), "lora_B.weight")?,
                scale: src.settings.scale(),
                dropout: src.settings.dropout as f32,
                rng: src.rng.clone(),
            })
        }
        _ => None,
    };
    Ok(Proj {
        base: Linear::new(weight, bias),
        lora,
    })
}

#[derive(Debug, Clone)]
struct Attention {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    heads: usize,
    kv_heads: usize,
    head: usize,
}

impl Attention {
    fn new(cfg: &ModelConfig, vb: VarBuilder, lora: Option<&LoraSource>) -> Result<Self> {
        let (h, kvh, d) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_size());
        let bias = cfg.attention_bias;
        let hid = cfg.hidden_size;
        Ok(Self {
            q: linear(hid, h * d, bias, vb.pp("q_proj"), LoraTarget::Q, lora)?,
            k: linear(hid, kvh * d, bias, vb.pp("k_proj"), LoraTarget::K, lora)?,
            v: linear(hid, kvh * d, bias, vb.pp("v_proj"), LoraTarget::V, lora)?,
            o: linear(h * d, hid, false, vb.pp("o_proj"), LoraTarget::O, lora)?,
            heads: h,
            kv_heads: kvh,
            head: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        pass: &Pass,
        rotary: &Rotary,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let train = pass.train;
        if let Some(f) = &pass.fused {
            // Tokens stay flat, `[b·t, heads·d]` (the memory of `[b, t, heads, d]`), throughout:
            // no transposes to copy and no reshapes for the backward pass to carry.
            let (x2, lead) = flat_tokens(x)?;
            let q = self.q.forward(&x2, train, true)?;
            let k = self.k.forward(&x2, train, true)?;
            let v = self.v.forward(&x2, train, true)?;
            let q = kernels::rope(&q, f.positions.clone(), f.tables.clone())?;
            let k = kernels::rope(&k, f.positions.clone(), f.tables.clone())?;
            let out = kernels::attention_flat(&q, &k, &v, f.segments.clone(), f.rows, self.head)?;
            let y = self.o.forward(&out, train, true)?;
            return unflat_tokens(y, &lead);
        }
        let (b, t, _) = x.dims3()?;
        let mask = pass
            .additive
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("composite attention without a mask".into()))?;
        let split = |y: Tensor, n: usize| -> Result<Tensor> {
            y.reshape((b, t, n, self.head))?
                .transpose(1, 2)?
                .contiguous()
        };
        let positions = &pass.positions;
        let q = rotary.apply(
            &split(self.q.forward(x, train, false)?, self.heads)?,
            positions,
        )?;
        let mut k = rotary.apply(
            &split(self.k.forward(x, train, false)?, self.kv_heads)?,
            positions,
        )?;
        let mut v = split(self.v.forward(x, train, false)?, self.kv_heads)?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            // Detached: generation never goes backward, and with the trained weights' graph
            // attached every cached step would keep the step before it alive, and with it
            // that step's attention over the whole cache (memory growing with the square of
            // the tokens generated).
            *slot = Some((k.detach(), v.detach()));
        }
        // Grouped-query attention: each key/value head serves `heads / kv_heads` query heads.
        let groups = self.heads / self.kv_heads;
        let repeat = |y: Tensor| -> Result<Tensor> {
            if groups == 1 {
                return Ok(y);
            }
            let (b, kvh, s, d) = y.dims4()?;
            y.unsqueeze(2)?
                .expand((b, kvh, groups, s, d))?
                .reshape((b, kvh * groups, s, d))
        };
        let k = repeat(k)?;
        let v = repeat(v)?;
        let scale = 1.0 / (self.head as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = probs.matmul(&v)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head))?;
        self.o.forward(&out, train, false)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Proj,
    up: Proj,
    down: Proj,
}

impl Mlp {
    fn new(cfg: &ModelConfig, vb: VarBuilder, lora: Option<&LoraSource>) -> Result<Self> {
        let (hid, inter) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate: linear(
                hid,
                inter,
                false,
                vb.pp("gate_proj"),
                LoraTarget::Gate,
                lora,
            )?,
            up: linear(hid, inter, false, vb.pp("up_proj"), LoraTarget::Up, lora)?,
            down: linear(
                inter,
                hid,
                false,
                vb.pp("down_proj"),
                LoraTarget::Down,
                lora,
            )?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool, fused: bool) -> Result<Tensor> {
        if fused
            && let (Some(g), Some(u)) = (self.gate.plain_weight(), self.up.plain_weight())
            && g.is_variable() == u.is_variable()
        {
            // Gate, up and SwiGLU in one op over every token.
            let (x2, lead) = flat_tokens(x)?;
            let h = kernels::gated_up(&x2, g, u, g.is_variable())?;
            let y = self.down.forward(&h, train, true)?;
            return unflat_tokens(y, &lead);
        }
        let gate = self.gate.forward(x, train, fused)?;
        let up = self.up.forward(x, train, fused)?;
        let h = if fused {
            kernels::swiglu(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        self.down.forward(&h, train, fused)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

impl Layer {
    /// The residual stream after this layer: attention, then the MLP, each on the normed input.
    fn forward(
        &self,
        x: &Tensor,
        pass: &Pass,
        rotary: &Rotary,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let fused = pass.fused.is_some();
        let h = self
            .attn
            .forward(&self.attn_norm.forward(x, fused)?, pass, rotary, cache)?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&self.mlp_norm.forward(&x, fused)?, pass.train, fused)?;
        x + h
    }
}

/// The decoder.
#[derive(Debug, Clone)]
pub struct Decoder {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    /// Its configuration.
    pub config: ModelConfig,
    device: Device,
    dropout: Arc<DropoutRng>,
    kernels: Kernels,
    checkpointing: bool,
}

/// `grads` with every gradient detached. A variable's gradient comes out of candle's backward
/// pass still tied to the graph that made it, and would keep that graph's activations alive.
fn detached(mut grads: candle_core::backprop::GradStore) -> candle_core::backprop::GradStore {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        if let Some(g) = grads.get_id(id).map(Tensor::detach) {
            grads.insert_id(id, g);
        }
    }
    grads
}

/// The attention pattern of a batch: segment ids per token (see [`attention_mask`]), or an
/// explicit additive mask.
#[derive(Debug, Clone)]
pub enum Mask {
    /// Segment ids `b × t` in row order: a token attends to earlier tokens of its own segment
    /// and of segment 0; [`PAD_SEGMENT`] marks padding.
    Segments {
        /// The ids.
        ids: Arc<Vec<u32>>,
        /// Rows.
        rows: usize,
        /// Tokens per row.
        len: usize,
    },
    /// An additive mask `[b, 1, t_query, t_key]` (0 or −∞).
    Additive(Tensor),
}

impl Mask {
    /// The additive `[b, 1, t, t]` form.
    pub fn additive(&self, device: &Device) -> Result<Tensor> {
        match self {
            Mask::Additive(m) => Ok(m.clone()),
            Mask::Segments { ids, rows, len } => {
                let (b, t) = (*rows, *len);
                let mut mask = vec![f32::NEG_INFINITY; b * t * t];
                for r in 0..b {
                    let seg = &ids[r * t..(r + 1) * t];
                    for i in 0..t {
                        let si = seg[i];
                        let row = &mut mask[(r * t + i) * t..(r * t + i + 1) * t];
                        if si == PAD_SEGMENT {
                            row[i] = 0.0;
                            continue;
                        }
                        for (j, m) in row.iter_mut().enumerate().take(i + 1) {
                            let sj = seg[j];
                            if sj != PAD_SEGMENT && (sj == 0 || sj == si) {
                                *m = 0.0;
                            }
                        }
                    }
                }
                Tensor::from_vec(mask, (b, 1, t, t), device)
            }
        }
    }
}

/// What every layer of one forward pass shares.
struct Pass {
    train: bool,
    positions: Tensor,
    /// The composite path's additive mask.
    additive: Option<Tensor>,
    /// The fused path's inputs.
    fused: Option<FusedPass>,
}

struct FusedPass {
    /// Rows and tokens per row.
    rows: (usize, usize),
    positions: Arc<Vec<u32>>,
    segments: Arc<Vec<u32>>,
    tables: Arc<RopeTables>,
}

impl Decoder {
    /// Builds the decoder from weights named as in Hugging Face checkpoints
    /// (`model.layers.0.self_attn.q_proj.weight`, …).
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(config, vb, None)
    }

    /// Builds the decoder with LoRA adapters on `settings.targets`, read from `lora_vb`
    /// (`model.layers.0.self_attn.q_proj.lora_A.weight`, … see [`init_lora`]).
    pub fn with_lora(
        config: &ModelConfig,
        vb: VarBuilder,
        settings: &LoraSettings,
        lora_vb: VarBuilder,
    ) -> Result<Self> {
        let source = LoraSource {
            settings,
            vb: lora_vb,
            rng: Arc::new(DropoutRng::default()),
        };
        Self::build(config, vb, Some(&source))
    }

    /// Seeds the dropout masks of the next forward pass (LoRA only; the trainer calls it before
    /// every micro-batch so that resuming draws the same masks).
    pub fn set_dropout_seed(&self, seed: u64) {
        self.dropout.seed.store(seed, Ordering::Relaxed);
        self.dropout.calls.store(0, Ordering::Relaxed);
    }

    fn build(config: &ModelConfig, vb: VarBuilder, lora: Option<&LoraSource>) -> Result<Self> {
        let cfg = config;
        let embed_w = vb.get(
            (cfg.vocab_size, cfg.hidden_size),
            "model.embed_tokens.weight",
        )?;
        let embed = Embedding::new(embed_w.clone(), cfg.hidden_size);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let lb = vb.pp(format!("model.layers.{i}"));
                Ok(Layer {
                    attn_norm: RmsNorm::new(
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                        lb.pp("input_layernorm"),
                    )?,
                    attn: Attention::new(cfg, lb.pp("self_attn"), lora)?,
                    mlp_norm: RmsNorm::new(
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                        lb.pp("post_attention_layernorm"),
                    )?,
                    mlp: Mlp::new(cfg, lb.pp("mlp"), lora)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("model.norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_w
        } else {
            vb.get((cfg.vocab_size, cfg.hidden_size), "lm_head.weight")?
        };
        let lm_head = Linear::new(lm_head, None);
        let rotary = Rotary::new(cfg, vb.dtype(), vb.device())?;
        let dropout = lora.map(|l| l.rng.clone()).unwrap_or_default();
        Ok(Self {
            dropout,
            embed,
            layers,
            norm,
            lm_head,
            rotary,
            config: cfg.clone(),
            device: vb.device().clone(),
            kernels: Kernels::default(),
            checkpointing: false,
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Chooses fused kernels or the composite ops (fused is the default).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Turns per-layer activation checkpointing on or off for [`Decoder::backward`]: a training
    /// pass then keeps only each layer's input and recomputes the layer's activations while the
    /// gradients flow back through it — one more forward pass, a fraction of the memory.
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// Whether [`Decoder::backward`] checkpoints activations per layer.
    pub fn activation_checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// Whether forward passes without a KV cache run the fused kernels: chosen, and the model is
    /// f32 on the CPU.
    pub fn fused(&self) -> bool {
        self.kernels == Kernels::Fused && self.rotary.tables.is_some()
    }

    /// Which kernels run, in words, for the run's start.
    pub fn kernels_in_use(&self) -> String {
        let kernels: String = match (self.kernels, self.fused()) {
            (Kernels::Composite, _) => "composite ops (chosen)".into(),
            (Kernels::Fused, true) => "fused CPU kernels".into(),
            (Kernels::Fused, false) => format!(
                "composite ops: the fused kernels are for f32 on the CPU, this model is {:?} on \
                 {}",
                self.rotary.cos.dtype(),
                if self.device.is_cpu() {
                    "the CPU"
                } else {
                    "a GPU"
                }
            ),
        };
        if self.checkpointing {
            return format!("{kernels}; activations checkpointed per layer");
        }
        kernels
    }

    /// Logits `[b, t, vocab]` for `input_ids` `[b, t]` at `positions` `[b, t]` under the attention
    /// `mask` (see [`attention_mask`]).
    pub fn forward(&self, input_ids: &Tensor, positions: &Tensor, mask: &Mask) -> Result<Tensor> {
        self.run(input_ids, positions, mask, None, false)
    }

    /// As [`Decoder::forward`], in training mode: LoRA dropout is applied.
    pub fn forward_train(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Mask,
    ) -> Result<Tensor> {
        self.run(input_ids, positions, mask, None, true)
    }

    fn pass(&self, positions: &Tensor, mask: &Mask, cached: bool, train: bool) -> Result<Pass> {
        let fused = match (mask, &self.rotary.tables) {
            (Mask::Segments { ids, rows, len }, Some(tables)) if self.fused() && !cached => {
                Some(FusedPass {
                    rows: (*rows, *len),
                    positions: Arc::new(positions.flatten_all()?.to_vec1::<u32>()?),
                    segments: ids.clone(),
                    tables: tables.clone(),
                })
            }
            _ => None,
        };
        let additive = match fused {
            Some(_) => None,
            None => Some(mask.additive(&self.device)?),
        };
        Ok(Pass {
            train,
            positions: positions.clone(),
            additive,
            fused,
        })
    }

    fn run(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Mask,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let (x, fused) = self.trunk(input_ids, positions, mask, cache, train)?;
        self.logits(&x, fused)
    }

    /// Logits `[b, t, vocab]` of final hidden states `[b, t, hidden]`, through the head the
    /// pass that made them used.
    pub fn logits(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if fused {
            let (b, t, hid) = x.dims3()?;
            let logits = self.head(&x.reshape((b * t, hid))?)?;
            return logits.reshape((b, t, logits.dim(1)?));
        }
        self.lm_head.forward(x)
    }

    /// A training pass and its backward pass: `loss_of` turns the final hidden states
    /// `[b, t, hidden]` (after the last norm; the flag says whether the fused kernels made
    /// them) into the scalar loss, and the gradients of every trained parameter come back.
    ///
    /// With activation checkpointing on, the forward pass keeps only each layer's input (one
    /// `[b, t, hidden]` tensor per layer) and drops the layer's activations; going backward,
    /// each layer is run again from its input, with the same dropout masks, and its part of the
    /// gradient is taken from `sum(output · upstream gradient)`. The gradients are the ones a
    /// plain pass gives. Without it, this is `loss_of(hidden).backward()`.
    pub fn backward(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Mask,
        loss_of: impl FnOnce(&Tensor, bool) -> Result<Tensor>,
    ) -> Result<candle_core::backprop::GradStore> {
        if !self.checkpointing {
            let (x, fused) = self.trunk(input_ids, positions, mask, None, true)?;
            return loss_of(&x, fused)?.backward();
        }
        let pass = self.pass(positions, mask, false, true)?;
        let fused = pass.fused.is_some();
        let missing = || candle_core::Error::Msg("no gradient reached a layer's input".into());
        let embedded = self.embedded(input_ids, fused)?;
        // The first layer's input needs a gradient only when the embedding is trained.
        let embedding_trained = embedded.track_op();
        let tracked = |x: &Tensor, i: usize| -> Result<Tensor> {
            if i > 0 || embedding_trained {
                Ok(Var::from_tensor(x)?.as_tensor().clone())
            } else {
                Ok(x.clone())
            }
        };
        let n = self.layers.len();
        let mut inputs = Vec::with_capacity(n);
        let mut dropout_calls = Vec::with_capacity(n);
        let mut x = embedded.detach();
        for layer in &self.layers[..n.saturating_sub(1)] {
            dropout_calls.push(self.dropout.calls.load(Ordering::Relaxed));
            // Detached: the layer's graph, and every activation it holds, goes with `out`.
            let out = layer.forward(&x, &pass, &self.rotary, None)?.detach();
            inputs.push(std::mem::replace(&mut x, out));
        }
        // The last layer keeps its graph: the loss's backward pass runs through it directly.
        let input = tracked(&x, n.saturating_sub(1))?;
        drop(x);
        let mut out = input.clone();
        if let Some(layer) = self.layers.last() {
            out = layer.forward(&input, &pass, &self.rotary, None)?;
        }
        let hidden = self.unflattened(self.norm.forward(&out, fused)?, input_ids)?;
        let mut grads = detached(loss_of(&hidden, fused)?.backward()?);
        drop(hidden);
        drop(out);
        let mut upstream = match grads.remove(&input) {
            Some(g) => g,
            None if !input.track_op() => return Ok(grads),
            None => return Err(missing()),
        };
        drop(input);
        for (i, layer) in self.layers[..n.saturating_sub(1)].iter().enumerate().rev() {
            let input = tracked(&inputs.pop().ok_or_else(missing)?, i)?;
            self.dropout
                .calls
                .store(dropout_calls[i], Ordering::Relaxed);
            let out = layer.forward(&input, &pass, &self.rotary, None)?;
            let mut part = detached((out * &upstream)?.sum_all()?.backward()?);
            part.remove(&upstream);
            if input.track_op() {
                upstream = part.remove(&input).ok_or_else(missing)?;
            }
            grads.extend(part)?;
        }
        if embedding_trained {
            grads.extend((embedded * &upstream)?.sum_all()?.backward()?)?;
        }
        Ok(grads)
    }

    /// The final hidden states `[b, t, hidden]` (after the last norm) in training mode, when the
    /// fused kernels run (`None` otherwise): with [`Decoder::head`] on the rows that are trained,
    /// the vocabulary-sized logits are computed only where a loss needs them.
    pub fn hidden_train(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Mask,
    ) -> Result<Option<Tensor>> {
        let (x, fused) = self.trunk(input_ids, positions, mask, None, true)?;
        Ok(fused.then_some(x))
    }

    /// The final hidden states `[b, t, hidden]` (after the last norm), for inference: with
    /// [`Decoder::head`] on the rows that are scored.
    pub fn hidden(&self, input_ids: &Tensor, positions: &Tensor, mask: &Mask) -> Result<Tensor> {
        Ok(self.trunk(input_ids, positions, mask, None, false)?.0)
    }

    /// Logits `[n, vocab]` of the rows `rows` (`[n]`, u32) of hidden states `[b, t, hidden]`
    /// flattened to `[b·t, hidden]`.
    pub fn head_at(&self, hidden: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let (b, t, hid) = hidden.dims3()?;
        self.head(&hidden.reshape((b * t, hid))?.index_select(rows, 0)?)
    }

    /// Logits `[n, vocab]` of hidden states `[n, hidden]`.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.lm_head.weight();
        match (self.fused(), w.is_variable()) {
            (false, _) => x.matmul(&w.t()?),
            (true, true) => kernels::trained_linear(x, w),
            (true, false) => kernels::frozen_linear(x, w),
        }
    }

    /// Embedding, layers and final norm; whether the fused kernels ran.
    fn trunk(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Mask,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<(Tensor, bool)> {
        let pass = self.pass(positions, mask, cache.is_some(), train)?;
        let fused = pass.fused.is_some();
        let mut x = self.embedded(input_ids, fused)?;
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize(self.layers.len(), None);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &pass, &self.rotary, slot)?;
        }
        let x = self.norm.forward(&x, fused)?;
        Ok((self.unflattened(x, input_ids)?, fused))
    }

    /// The embeddings of `input_ids` `[b, t]`: `[b, t, hidden]`, or flat, `[b·t, hidden]`, for
    /// the fused kernels, which keep the residual stream flat (each reshape would be one more
    /// activation-sized gradient for candle's backward pass to add up).
    fn embedded(&self, input_ids: &Tensor, fused: bool) -> Result<Tensor> {
        if fused {
            self.embed
                .embeddings()
                .index_select(&input_ids.flatten_all()?, 0)
        } else {
            self.embed.forward(input_ids)
        }
    }

    /// Hidden states `[b, t, hidden]` of `input_ids` `[b, t]`, from flat ones or as they are.
    fn unflattened(&self, x: Tensor, input_ids: &Tensor) -> Result<Tensor> {
        if x.rank() != 2 {
            return Ok(x);
        }
        let (b, t) = input_ids.dims2()?;
        let hid = x.dim(1)?;
        x.reshape((b, t, hid))
    }

    /// Logits of the next token after `new_ids` (batch of one), extending `cache`.
    pub fn step(&self, new_ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let start = cache.len();
        let n = new_ids.len();
        let ids = Tensor::new(new_ids, &self.device)?.unsqueeze(0)?;
        let positions =
            Tensor::arange(start as u32, (start + n) as u32, &self.device)?.unsqueeze(0)?;
        // New tokens see every cached token and the new ones before them.
        let total = start + n;
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j <= start + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Mask::Additive(Tensor::from_vec(mask, (1, 1, n, total), &self.device)?);
        let logits = self.run(&ids, &positions, &mask, Some(cache), false)?;
        // Detached, so that the step's graph (every layer's activations) is freed now.
        Ok(logits.i((0, n - 1))?.detach())
    }

    /// Greedy (temperature 0) or sampled generation of up to `max_new` tokens after `prompt`,
    /// stopping at any of `stop`. Returns the new tokens.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        temperature: f64,
        seed: u64,
    ) -> Result<Vec<u32>> {
        let mut cache = KvCache::default();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let limit = self.config.max_position_embeddings;
        let mut out = Vec::new();
        let mut logits = self.step(prompt, &mut cache)?;
        while out.len() < max_new && cache.len() < limit {
            let next = pick(&logits, temperature, &mut rng)?;
            if stop.contains(&next) {
                break;
            }
            out.push(next);
            logits = self.step(&[next], &mut cache)?;
        }
        Ok(out)
    }
}

/// The most likely token, or one drawn at `temperature`.
fn pick(logits: &Tensor, temperature: f64, rng: &mut ChaCha8Rng) -> Result<u32> {
    let logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
    if temperature <= 0.0 {
        return Ok(logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32));
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| (((l - max) as f64) / temperature).exp())
        .collect();
    let dist = rand::distr::weighted::WeightedIndex::new(&weights)
        .map_err(|e| candle_core::Error::Msg(format!("sampling: {e}")))?;
    Ok(dist.sample(rng) as u32)
}

/// The attention mask for rows of segment ids, each padded (or cut) to `t`: token `i` may
/// attend to token `j` when `j ≤ i` and `j`'s segment is 0 (the shared prefix) or `i`'s own.
/// Padding ([`PAD_SEGMENT`]) is never attended to (a padding query sees only itself, to stay
/// finite). [`Mask::additive`] gives the `[b, 1, t, t]` form.
pub fn attention_mask(segment_ids: &[Vec<u32>], t: usize, _device: &Device) -> Result<Mask> {
    let ids = segment_ids
        .iter()
        .flat_map(|seg| (0..t).map(|i| seg.get(i).copied().unwrap_or(PAD_SEGMENT)))
        .collect();
    Ok(Mask::Segments {
        ids: Arc::new(ids),
        rows: segment_ids.len(),
        len: t,
    })
}

/// Names and shapes of every weight of a decoder with `cfg`, as in HF checkpoints.
pub fn weight_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, kvh, d, hid, inter) = (
        cfg.num_attention_heads,
        cfg.kv_heads(),
        cfg.head_size(),
        cfg.hidden_size,
        cfg.intermediate_size,
    );
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, hid],
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![hid]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![hid]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![h * d, hid]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kvh * d, hid]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kvh * d, hid]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![hid, h * d]));
        if cfg.attention_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![h * d]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kvh * d]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kvh * d]));
        }
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, hid]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![inter, hid]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![hid, inter]));
    }
    out.push(("model.norm.weight".to_string(), vec![hid]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, hid]));
    }
    out
}

/// A fresh, seeded set of trainable weights: norms at one, biases at zero, everything else
/// normal with standard deviation 0.02. The same seed always gives the same weights.
pub fn init_weights(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<VarMap> {
    let varmap = VarMap::new();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.02).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("weight map lock poisoned".to_string()))?;
        for (name, shape) in weight_shapes(cfg) {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            let tensor = Tensor::from_vec(values, shape, device)?;
            data.insert(name, Var::from_tensor(&tensor)?);
        }
    }
    Ok(varmap)
}

/// The variables of a weight map, sorted by name (a stable order for optimizers and checkpoints).
pub fn named_vars(weights: &VarMap) -> Vec<(String, Var)> {
    let mut vars: Vec<(String, Var)> = match weights.data().lock() {
        Ok(data) => data.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        // A poisoned lock means another thread panicked mid-update; its data is still whole.
        Err(poisoned) => poisoned
            .into_inner()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Names and shapes of the LoRA adapters `settings` puts on a decoder with `cfg`
/// (`….q_proj.lora_A.weight` `[rank, in]`, `….q_proj.lora_B.weight` `[out, rank]`).
pub fn lora_shapes(cfg: &ModelConfig, settings: &LoraSettings) -> Vec<(String, Vec<usize>)> {
    let r = settings.rank;
    let mut out = Vec::new();
    for (name, shape) in weight_shapes(cfg) {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let targeted = settings
            .targets
            .iter()
            .any(|t| module.ends_with(&format!(".{}", t.module())));
        if targeted && shape.len() == 2 {
            out.push((format!("{module}.lora_A.weight"), vec![r, shape[1]]));
            out.push((format!("{module}.lora_B.weight"), vec![shape[0], r]));
        }
    }
    out
}

/// Fresh, seeded LoRA adapters: A uniform in ±1/√in (PEFT's Kaiming default), B zero, so the
/// adapted model starts equal to the base.
pub fn init_lora(
    cfg: &ModelConfig,
    settings: &LoraSettings,
    seed: u64,
    device: &Device,
) -> Result<VarMap> {
    let varmap = VarMap::new();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4c6f_5241);
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("weight map lock poisoned".to_string()))?;
        for (name, shape) in lora_shapes(cfg, settings) {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with("lora_A.weight") {
                let bound = 1.0 / (shape[1] as f32).sqrt();
                let uniform = rand_distr::Uniform::new(-bound, bound)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                (0..n).map(|_| uniform.sample(&mut rng)).collect()
            } else {
                vec![0.0; n]
            };
            data.insert(
                name,
                Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?,
            );
        }
    }
    Ok(varmap)
}

/// The base weights with every adapter folded in: `W + scale · B A`.
pub fn merge_lora(
    base: &[(String, Tensor)],
    adapters: &[(String, Tensor)],
    settings: &LoraSettings,
) -> Result<Vec<(String, Tensor)>> {
    let find = |name: &str| adapters.iter().find(|(n, _)| n == name).map(|(_, t)| t);
    base.iter()
        .map(|(name, w)| {
            let module = name.strip_suffix(".weight").unwrap_or(name);
            let a = find(&format!("{module}.lora_A.weight"));
            let b = find(&format!("{module}.lora_B.weight"));
            let merged = match (a, b) {
                (Some(a), Some(b)) => {
                    let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)?
                        * settings.scale())?;
                    (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?
                }
                _ => w.clone(),
            };
            Ok((name.clone(), merged))
        })
        .collect()
}

/// A decoder over freshly initialised, trainable weights.
pub fn new_trainable(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<(Decoder, VarMap)> {
    let varmap = init_weights(cfg, seed, device)?;
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = Decoder::new(cfg, vb)?;
    Ok((model, varmap))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 50,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            attention_bias: true,
            ..ModelConfig::tiny(50)
        }
    }

    fn batch(ids: &[Vec<u32>], segs: &[Vec<u32>]) -> (Tensor, Tensor, Mask) {
        let dev = Device::Cpu;
        let t = ids[0].len();
        let flat: Vec<u32> = ids.concat();
        let input = Tensor::from_vec(flat, (ids.len(), t), &dev).unwrap();
        let pos: Vec<u32> = (0..ids.len()).flat_map(|_| 0..t as u32).collect();
        let pos = Tensor::from_vec(pos, (ids.len(), t), &dev).unwrap();
        let mask = attention_mask(segs, t, &dev).unwrap();
        (input, pos, mask)
    }

    /// The loss and every parameter's gradient on a small batch, with `kernels`.
    fn loss_and_grads(kernels: Kernels) -> (f32, Vec<(String, Tensor)>) {
        let cfg = tiny();
        let (mut model, varmap) = new_trainable(&cfg, 1, &Device::Cpu).unwrap();
        model.set_kernels(kernels);
        assert_eq!(model.fused(), kernels == Kernels::Fused);
        let ids = vec![vec![1, 5, 9, 3, 7, 2, 8, 4], vec![6, 2, 2, 9, 1, 0, 0, 0]];
        let segs = [
            vec![0, 1, 1, 1, 2, 2, 2, 2],
            vec![1, 1, 1, 1, 1, PAD_SEGMENT, PAD_SEGMENT, PAD_SEGMENT],
        ];
        let (input, pos, mask) = batch(&ids, &segs);
        let logits = model.forward_train(&input, &pos, &mask).unwrap();
        let targets = Tensor::new(&[5u32, 9, 3, 7, 2, 8, 4, 1], &Device::Cpu).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits.get(0).unwrap(), &targets).unwrap();
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        assert_eq!(data.len(), weight_shapes(&cfg).len());
        let mut out: Vec<(String, Tensor)> = data
            .iter()
            .map(|(name, var)| {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient reaches {name} ({kernels:?})"));
                (name.clone(), g.clone())
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        (loss.to_scalar().unwrap(), out)
    }

    /// The loss and the gradients of `vars` through [`Decoder::backward`], with activation
    /// checkpointing on or off.
    fn backward_grads(
        model: &mut Decoder,
        vars: &[(String, Var)],
        checkpointing: bool,
        seed: u64,
    ) -> (f32, Vec<(String, Tensor)>) {
        model.set_activation_checkpointing(checkpointing);
        model.set_dropout_seed(seed);
        let ids = vec![vec![1, 5, 9, 3, 7, 2, 8, 4], vec![6, 2, 2, 9, 1, 0, 0, 0]];
        let segs = [
            vec![0, 1, 1, 1, 2, 2, 2, 2],
            vec![1, 1, 1, 1, 1, PAD_SEGMENT, PAD_SEGMENT, PAD_SEGMENT],
        ];
        let (input, pos, mask) = batch(&ids, &segs);
        let targets = Tensor::new(&[5u32, 9, 3, 7, 2, 8, 4, 1], &Device::Cpu).unwrap();
        let mut value = 0f32;
        let model = &*model;
        let grads = model
            .backward(&input, &pos, &mask, |hidden, fused| {
                let logits = model.logits(hidden, fused)?;
                let loss = candle_nn::loss::cross_entropy(&logits.get(0)?, &targets)?;
                value = loss.to_scalar()?;
                Ok(loss)
            })
            .unwrap();
        let grads = vars
            .iter()
            .map(|(name, v)| {
                let g = grads.get(v.as_tensor()).unwrap_or_else(|| {
                    panic!("no gradient reaches {name} (checkpointing {checkpointing})")
                });
                (name.clone(), g.clone())
            })
            .collect();
        (value, grads)
    }

    fn assert_same_grads(
        what: &str,
        a: &(f32, Vec<(String, Tensor)>),
        b: &(f32, Vec<(String, Tensor)>),
    ) {
        assert!((a.0 - b.0).abs() < 1e-6, "{what}: loss {} vs {}", a.0, b.0);
        for ((name, x), (_, y)) in a.1.iter().zip(&b.1) {
            let norm: f32 = x.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm > 0.0, "{what}: zero gradient for {name}");
            let diff = crate::train::kernels::tests::max_diff(x, y);
            assert!(diff < 1e-5, "{what}: {name}'s gradients differ by {diff}");
        }
    }

    #[test]
    fn checkpointed_layers_give_the_plain_gradients() {
        for kernels in [Kernels::Fused, Kernels::Composite] {
            let (mut model, varmap) = new_trainable(&tiny(), 3, &Device::Cpu).unwrap();
            model.set_kernels(kernels);
            let vars = named_vars(&varmap);
            let plain = backward_grads(&mut model, &vars, false, 7);
            let checkpointed = backward_grads(&mut model, &vars, true, 7);
            assert_same_grads(&format!("full, {kernels:?}"), &plain, &checkpointed);
        }
    }

    #[test]
    fn checkpointed_lora_layers_redraw_the_same_dropout() {
        let cfg = tiny();
        let dev = Device::Cpu;
        let base: Vec<(String, Tensor)> = named_vars(&init_weights(&cfg, 5, &dev).unwrap())
            .into_iter()
            .map(|(k, v)| (k, v.as_detached_tensor()))
            .collect();
        let settings = LoraSettings {
            enabled: true,
            dropout: 0.3,
            targets: vec![
                LoraTarget::Q,
                LoraTarget::V,
                LoraTarget::Gate,
                LoraTarget::Down,
            ],
            ..LoraSettings::default()
        };
        let adapters = init_lora(&cfg, &settings, 9, &dev).unwrap();
        let vars = named_vars(&adapters);
        // B starts at zero; random values let every A see a gradient too.
        for (name, v) in &vars {
            if name.ends_with("lora_B.weight") {
                v.set(&Tensor::randn(0f32, 0.1, v.dims(), &dev).unwrap())
                    .unwrap();
            }
        }
        for kernels in [Kernels::Fused, Kernels::Composite] {
            let mut model = Decoder::with_lora(
                &cfg,
                VarBuilder::from_tensors(base.iter().cloned().collect(), DType::F32, &dev),
                &settings,
                VarBuilder::from_varmap(&adapters, DType::F32, &dev),
            )
            .unwrap();
            model.set_kernels(kernels);
            let plain = backward_grads(&mut model, &vars, false, 7);
            let checkpointed = backward_grads(&mut model, &vars, true, 7);
            assert_same_grads(&format!("LoRA, {kernels:?}"), &plain, &checkpointed);
            // Dropout is really on: other masks give another loss.
            let other = backward_grads(&mut model, &vars, true, 8);
            assert!(
                (other.0 - plain.0).abs() > 1e-4,
                "{} vs {}",
                other.0,
                plain.0
            );
        }
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        for kernels in [Kernels::Fused, Kernels::Composite] {
            for (name, g) in loss_and_grads(kernels).1 {
                let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
                assert!(norm > 0.0, "zero gradient for {name} ({kernels:?})");
            }
        }
    }

    #[test]
    fn fused_kernels_give_the_composite_loss_and_gradients() {
        let (fused_loss, fused) = loss_and_grads(Kernels::Fused);
        let (comp_loss, comp) = loss_and_grads(Kernels::Composite);
        assert!(
            (fused_loss - comp_loss).abs() < 1e-5,
            "{fused_loss} vs {comp_loss}"
        );
        for ((name, a), (_, b)) in fused.iter().zip(&comp) {
            let diff = crate::train::kernels::tests::max_diff(a, b);
            assert!(diff < 1e-5, "{name}: gradients differ by {diff}");
        }
    }

    #[test]
    fn isolated_segments_do_not_see_each_other() {
        let (model, _) = new_trainable(&tiny(), 2, &Device::Cpu).unwrap();
        let segs = vec![vec![0, 0, 1, 1, 1, 2, 2, 2]];
        let a = vec![vec![3, 4, 10, 11, 12, 20, 21, 22]];
        // Change segment 1 only: segment 2's logits must not move; the prefix (0) is shared.
        let b = vec![vec![3, 4, 30, 31, 32, 20, 21, 22]];
        let (ia, pa, ma) = batch(&a, &segs);
        let (ib, pb, mb) = batch(&b, &segs);
        let la = model.forward(&ia, &pa, &ma).unwrap();
        let lb = model.forward(&ib, &pb, &mb).unwrap();
        let seg2 = |l: &Tensor| {
            l.i((0, 5..8))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let diff: f32 = seg2(&la)
            .iter()
            .zip(seg2(&lb))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "segment 2 moved by {diff}");
        let seg1 = |l: &Tensor| {
            l.i((0, 2..5))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let moved: f32 = seg1(&la)
            .iter()
            .zip(seg1(&lb))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(moved > 1e-4, "the changed segment must change");
        // With one segment for all (full attention), the same change does reach segment 2.
        let full = vec![vec![0; 8]];
        let (ia, pa, ma) = batch(&a, &full);
        let (ib, pb, mb) = batch(&b, &full);
        let la = model.forward(&ia, &pa, &ma).unwrap();
        let lb = model.forward(&ib, &pb, &mb).unwrap();
        let diff: f32 = seg2(&la)
            .iter()
            .zip(seg2(&lb))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff > 1e-4);
    }

    #[test]
    fn padding_is_never_attended() {
        let (model, _) = new_trainable(&tiny(), 3, &Device::Cpu).unwrap();
        let segs = vec![vec![1, 1, 1, PAD_SEGMENT, PAD_SEGMENT]];
        let (ia, pa, ma) = batch(&[vec![5, 6, 7, 0, 0]], &segs);
        let (ib, pb, mb) = batch(&[vec![5, 6, 7, 9, 9]], &segs);
        let la = model.forward(&ia, &pa, &ma).unwrap().i((0, 0..3)).unwrap();
        let lb = model.forward(&ib, &pb, &mb).unwrap().i((0, 0..3)).unwrap();
        let diff: f32 = (la - lb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-6);
    }

    #[test]
    fn kv_cache_matches_a_full_forward_and_generation_is_deterministic() {
        let (model, _) = new_trainable(&tiny(), 4, &Device::Cpu).unwrap();
        let ids = vec![vec![1u32, 2, 3, 4, 5, 6]];
        let (input, pos, mask) = batch(&ids, &[vec![1; 6]]);
        let full = model
            .forward(&input, &pos, &mask)
            .unwrap()
            .i((0, 5))
            .unwrap();
        let mut cache = KvCache::default();
        model.step(&[1, 2, 3], &mut cache).unwrap();
        model.step(&[4], &mut cache).unwrap();
        let last = model.step(&[5, 6], &mut cache).unwrap();
        assert_eq!(cache.len(), 6);
        // Nothing a step returns or caches holds on to the graph of the weights: each step's
        // activations are freed when it ends.
        assert!(!last.track_op());
        for (k, v) in cache.layers.iter().flatten() {
            assert!(!k.track_op() && !v.track_op());
        }
        let diff: f32 = (full - last)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-4, "cached step differs by {diff}");
        let a = model.generate(&[1, 2, 3], 8, &[], 0.0, 0).unwrap();
        assert_eq!(a, model.generate(&[1, 2, 3], 8, &[], 0.0, 0).unwrap());
        assert_eq!(a.len(), 8);
        let s1 = model.generate(&[1, 2, 3], 8, &[], 1.0, 7).unwrap();
        assert_eq!(s1, model.generate(&[1, 2, 3], 8, &[], 1.0, 7).unwrap());
    }

    #[test]
    fn seeded_init_is_reproducible() {
        let cfg = tiny();
        let a = init_weights(&cfg, 9, &Device::Cpu).unwrap();
        let b = init_weights(&cfg, 9, &Device::Cpu).unwrap();
        let get = |m: &VarMap| -> Vec<f32> {
            m.data().lock().unwrap()["model.layers.0.self_attn.q_proj.weight"]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(get(&a), get(&b));
    }
}
