//! Fused CPU kernels with their backward passes, for training on the CPU in f32.
//!
//! Candle's composite forms of attention, RMSNorm, rotary embeddings, SwiGLU and cross-entropy
//! walk memory many times per step and keep every intermediate alive for the backward pass.
//! These kernels do each in one pass (two for the backward), as candle `CustomOp`s whose `bwd`
//! computes the gradients directly:
//! - [`attention`]: causal attention over segment ids, grouped-query heads served in place. It
//!   visits only the key blocks a query may see (the shared prefix and its own segment), so a row
//!   of eight 256-token segments costs about eight 256-token rows; the probabilities are
//!   recomputed in the backward pass from the saved log-sum-exp instead of being stored.
//! - [`rms_norm`], [`rope`], [`swiglu`]: row-wise and element-wise, parallel over rows.
//! - [`cross_entropy`]: each target's log-probability straight from the logits; the gradient is
//!   written once, row by row, and rows that carry no loss are skipped.
//! - [`frozen_linear`]: `x · Wᵀ` for a weight that is not trained (LoRA's base), whose backward
//!   computes only the input's gradient.
//!
//! Each kernel has a test that its output and gradients equal the composite form's.

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, bail,
};
use rayon::prelude::*;

use crate::train::model::PAD_SEGMENT;
use crate::train::vexp;

/// The contiguous f32 data of a CPU storage.
fn data<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        bail!("fused kernels take f32 tensors")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => bail!("fused kernels take contiguous tensors"),
    }
}

/// Calls `f` with the contiguous f32 data of a CPU tensor.
fn with_data<R>(tensor: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let tensor = tensor.contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(data(s, layout)?),
        _ => bail!("fused kernels run on the CPU"),
    }
}

/// A tensor from computed values, on `like`'s device.
fn tensor_like(values: Vec<f32>, shape: &Shape, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values, shape, like.device())
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint part.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: tasks given a `SharedMut` write disjoint ranges and the owner outlives them.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole wrapper, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst (m×n, row stride dst_rs) = [dst +] alpha · A · B`, where `A` is `m×k` with row and column
/// strides `a_rs`, `a_cs` and `B` is `k×n` with `b_rs`, `b_cs`. Single-threaded: callers
/// parallelise over independent blocks.
///
/// # Safety
/// Every element addressed through the pointers and strides must be in bounds, and `dst` must
/// not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs, b_cs): (*const f32, usize, usize),
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i of dst is in bounds by the caller's contract.
                unsafe { std::ptr::write_bytes(dst.add(i * dst_rs), 0, n) };
            }
        }
        return;
    }
    // SAFETY: forwarded from the caller's contract; gemm reads and writes only the addressed
    // elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Attention over segments

/// Query rows handled together: one block of scores is `TILE × keys`.
const TILE: usize = 64;

/// A block of queries of one row and its key ranges.
#[derive(Debug, Clone)]
struct QueryTile {
    row: usize,
    start: usize,
    end: usize,
    /// Padding queries see only themselves.
    pad: bool,
    /// Key ranges `[start, end)` the tile's queries may see (causality applied per query).
    keys: Vec<(usize, usize)>,
}

impl QueryTile {
    fn key_count(&self) -> usize {
        self.keys.iter().map(|(a, b)| b - a).sum()
    }
}

/// Splits each row's segment runs into query tiles with their visible key ranges: a token sees
/// earlier tokens of its own segment and of segment 0 (the shared prefix), never padding.
fn plan_tiles(segments: &[u32], rows: usize, t: usize) -> Vec<QueryTile> {
    let mut tiles = Vec::new();
    for row in 0..rows {
        let seg = &segments[row * t..(row + 1) * t];
        let mut runs: Vec<(usize, usize, u32)> = Vec::new();
        for (i, &s) in seg.iter().enumerate() {
            match runs.last_mut() {
                Some(last) if last.2 == s => last.1 = i + 1,
                _ => runs.push((i, i + 1, s)),
            }
        }
        for &(start, end, s) in &runs {
            if s == PAD_SEGMENT {
                tiles.push(QueryTile {
                    row,
                    start,
                    end,
                    pad: true,
                    keys: Vec::new(),
                });
                continue;
            }
            let mut qa = start;
            while qa < end {
                let qe = (qa + TILE).min(end);
                let keys = runs
                    .iter()
                    .filter(|r| r.2 != PAD_SEGMENT && (r.2 == 0 || r.2 == s) && r.0 < qe)
                    .map(|r| (r.0, r.1.min(qe)))
                    .collect();
                tiles.push(QueryTile {
                    row,
                    start: qa,
                    end: qe,
                    pad: false,
                    keys,
                });
                qa = qe;
            }
        }
    }
    tiles
}

/// Shapes of an attention call: q `[b, t, heads, d]`, k and v `[b, t, kv_heads, d]`.
#[derive(Debug, Clone, Copy)]
struct AttnDims {
    b: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
}

impl AttnDims {
    fn q_at(&self, row: usize, i: usize, head: usize) -> usize {
        ((row * self.t + i) * self.heads + head) * self.d
    }
    fn kv_at(&self, row: usize, i: usize, kv_head: usize) -> usize {
        ((row * self.t + i) * self.kv_heads + kv_head) * self.d
    }
    fn q_rs(&self) -> usize {
        self.heads * self.d
    }
    fn kv_rs(&self) -> usize {
        self.kv_heads * self.d
    }
}

/// Causal attention over segment ids; see [`attention`].
struct SegmentAttention {
    segments: Arc<Vec<u32>>,
    scale: f32,
    /// Rows, tokens per row and head size when `q`, `k` and `v` come flat, `[b·t, heads·d]`.
    flat: Option<(usize, usize, usize)>,
    /// Log-sum-exp of every query's scores `[b, heads, t]`, saved by the forward pass.
    lse: Mutex<Vec<f32>>,
}

impl SegmentAttention {
    /// `[b, t, heads, d]` of `x`, given as it is or flat.
    fn split(&self, x: &Layout) -> Result<(usize, usize, usize, usize)> {
        match self.flat {
            None => x.shape().dims4(),
            Some((b, t, d)) => {
                let (m, cols) = x.shape().dims2()?;
                if m != b * t || d == 0 || cols % d != 0 {
                    bail!(
                        "attention: {:?} is not {b} × {t} tokens of {d}-wide heads",
                        x.shape()
                    );
                }
                Ok((b, t, cols / d, d))
            }
        }
    }

    fn dims(&self, q: &Layout, k: &Layout) -> Result<AttnDims> {
        let (b, t, heads, d) = self.split(q)?;
        let (kb, kt, kv_heads, kd) = self.split(k)?;
        if (kb, kt, kd) != (b, t, d) || kv_heads == 0 || heads % kv_heads != 0 {
            bail!(
                "attention: q {:?} and k {:?} do not match",
                q.shape(),
                k.shape()
            );
        }
        if self.segments.len() != b * t {
            bail!(
                "attention: {} segment ids for {b} × {t} tokens",
                self.segments.len()
            );
        }
        Ok(AttnDims {
            b,
            t,
            heads,
            kv_heads,
            d,
        })
    }

    /// Scores of `tile` for `head` into `scores` (`nq × nk`), masked and turned into
    /// probabilities with `lse` (given) or computing and returning each query's log-sum-exp.
    ///
    /// # Safety
    /// `q` and `k` must hold the tensors `dims` describes.
    unsafe fn probabilities(
        &self,
        dims: &AttnDims,
        tile: &QueryTile,
        head: usize,
        (q, k): (&[f32], &[f32]),
        scores: &mut [f32],
        lse: Option<&[f32]>,
    ) -> Vec<f32> {
        let nq = tile.end - tile.start;
        let nk = tile.key_count();
        let g = head / (dims.heads / dims.kv_heads);
        let mut col = 0;
        for &(ka, kb) in &tile.keys {
            // SAFETY: tile rows and key ranges lie inside the row; strides from `dims`.
            unsafe {
                matmul(
                    (nq, kb - ka, dims.d),
                    scores.as_mut_ptr().add(col),
                    nk,
                    false,
                    (
                        q.as_ptr().add(dims.q_at(tile.row, tile.start, head)),
                        dims.q_rs(),
                        1,
                    ),
                    (k.as_ptr().add(dims.kv_at(tile.row, ka, g)), 1, dims.kv_rs()),
                    self.scale,
                );
            }
            col += kb - ka;
        }
        let mut out_lse = Vec::new();
        for i in 0..nq {
            let qi = tile.start + i;
            let row = &mut scores[i * nk..(i + 1) * nk];
            let mut col = 0;
            for &(ka, kb) in &tile.keys {
                for j in ka.max(qi + 1)..kb {
                    row[col + j - ka] = f32::NEG_INFINITY;
                }
                col += kb - ka;
            }
            match lse {
                Some(lse) => {
                    vexp::exp_in_place(row, lse[i]);
                }
                None => {
                    let max = vexp::max(row);
                    let sum = vexp::exp_in_place(row, max);
                    let inv = 1.0 / sum;
                    for s in row.iter_mut() {
                        *s *= inv;
                    }
                    out_lse.push(max + sum.ln());
                }
            }
        }
        out_lse
    }
}

impl CustomOp3 for SegmentAttention {
    fn name(&self) -> &'static str {
        "segment-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(ql, kl)?;
        let (q, k, v) = (data(qs, ql)?, data(ks, kl)?, data(vs, vl)?);
        let tiles = plan_tiles(&self.segments, dims.b, dims.t);
        let mut out = vec![0f32; q.len()];
        let mut lse = vec![0f32; dims.b * dims.heads * dims.t];
        let out_ptr = SharedMut(out.as_mut_ptr());
        let lse_ptr = SharedMut(lse.as_mut_ptr());
        let groups = dims.heads / dims.kv_heads;
        (0..tiles.len() * dims.heads)
            .into_par_iter()
            .for_each(|task| {
                let (tile, head) = (&tiles[task / dims.heads], task % dims.heads);
                let g = head / groups;
                if tile.pad {
                    for i in tile.start..tile.end {
                        let src = &v[dims.kv_at(tile.row, i, g)..][..dims.d];
                        // SAFETY: each (row, query, head) output is written by one task.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                src.as_ptr(),
                                out_ptr.get().add(dims.q_at(tile.row, i, head)),
                                dims.d,
                            );
                        }
                    }
                    return;
                }
                let nq = tile.end - tile.start;
                let nk = tile.key_count();
                let mut scores = vec![0f32; nq * nk];
                // SAFETY: q and k hold the tensors `dims` describes.
                let tile_lse =
                    unsafe { self.probabilities(&dims, tile, head, (q, k), &mut scores, None) };
                let mut col = 0;
                for (n, &(ka, kb)) in tile.keys.iter().enumerate() {
                    // SAFETY: this task alone writes these output rows of `head`.
                    unsafe {
                        matmul(
                            (nq, dims.d, kb - ka),
                            out_ptr.get().add(dims.q_at(tile.row, tile.start, head)),
                            dims.q_rs(),
                            n > 0,
                            (scores.as_ptr().add(col), nk, 1),
                            (v.as_ptr().add(dims.kv_at(tile.row, ka, g)), dims.kv_rs(), 1),
                            1.0,
                        );
                    }
                    col += kb - ka;
                }
                let base = (tile.row * dims.heads + head) * dims.t + tile.start;
                for (i, l) in tile_lse.into_iter().enumerate() {
                    // SAFETY: each (row, head, query) log-sum-exp is written by one task.
                    unsafe { *lse_ptr.get().add(base + i) = l };
                }
            });
        if let Ok(mut saved) = self.lse.lock() {
            *saved = lse;
        }
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = match self.lse.lock() {
            Ok(l) => l.clone(),
            Err(_) => bail!("attention: saved state poisoned"),
        };
        let (qc, kc) = (q.contiguous()?, k.contiguous()?);
        let dims = self.dims(qc.layout(), kc.layout())?;
        let tiles = plan_tiles(&self.segments, dims.b, dims.t);
        let groups = dims.heads / dims.kv_heads;
        let (dq, dkv) = with_data(q, |q| {
            with_data(k, |k| {
                with_data(v, |v| {
                    with_data(res, |o| {
                        with_data(grad, |g| {
                            Ok(self.backward(&dims, &tiles, (q, k, v, o, g), &lse))
                        })
                    })
                })
            })
        })?;
        // Sum the per-query-head key and value gradients into their kv heads.
        let (t, d, kvh) = (dims.t, dims.d, dims.kv_heads);
        let mut dk = vec![0f32; dims.b * t * kvh * d];
        let mut dv = vec![0f32; dims.b * t * kvh * d];
        dk.par_chunks_mut(kvh * d)
            .zip(dv.par_chunks_mut(kvh * d))
            .enumerate()
            .for_each(|(pos, (dk_pos, dv_pos))| {
                let (row, i) = (pos / t, pos % t);
                for head in 0..dims.heads {
                    let (lk, lv) = &dkv[row * dims.heads + head];
                    let g = head / groups;
                    for (x, y) in dk_pos[g * d..(g + 1) * d].iter_mut().zip(&lk[i * d..]) {
                        *x += y;
                    }
                    for (x, y) in dv_pos[g * d..(g + 1) * d].iter_mut().zip(&lv[i * d..]) {
                        *x += y;
                    }
                }
            });
        Ok((
            Some(tensor_like(dq, q.shape(), q)?),
            Some(tensor_like(dk, k.shape(), k)?),
            Some(tensor_like(dv, v.shape(), v)?),
        ))
    }
}

/// Queries, keys, values, outputs and output gradients of an attention call.
type AttnData<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32], &'a [f32]);

/// Gradients of one row and query head's keys and values `[t, d]` each.
type KvGrads = (Vec<f32>, Vec<f32>);

impl SegmentAttention {
    /// The query gradient `[b, t, heads, d]` and, per (row, query head), key and value
    /// gradients.
    fn backward(
        &self,
        dims: &AttnDims,
        tiles: &[QueryTile],
        (q, k, v, o, g): AttnData,
        lse: &[f32],
    ) -> (Vec<f32>, Vec<KvGrads>) {
        let mut dq = vec![0f32; q.len()];
        let dq_ptr = SharedMut(dq.as_mut_ptr());
        let groups = dims.heads / dims.kv_heads;
        let (t, d) = (dims.t, dims.d);
        let kv = (0..dims.b * dims.heads)
            .into_par_iter()
            .map(|task| {
                let (row, head) = (task / dims.heads, task % dims.heads);
                let kvh = head / groups;
                let mut dk = vec![0f32; t * d];
                let mut dv = vec![0f32; t * d];
                for tile in tiles.iter().filter(|tile| tile.row == row) {
                    if tile.pad {
                        for i in tile.start..tile.end {
                            let gi = &g[dims.q_at(row, i, head)..][..d];
                            for (x, y) in dv[i * d..(i + 1) * d].iter_mut().zip(gi) {
                                *x += y;
                            }
                        }
                        continue;
                    }
                    let nq = tile.end - tile.start;
                    let nk = tile.key_count();
                    let lse_at = (row * dims.heads + head) * t + tile.start;
                    let mut p = vec![0f32; nq * nk];
                    // SAFETY: q and k hold the tensors `dims` describes.
                    unsafe {
                        self.probabilities(
                            dims,
                            tile,
                            head,
                            (q, k),
                            &mut p,
                            Some(&lse[lse_at..lse_at + nq]),
                        );
                    }
                    let q_tile = dims.q_at(row, tile.start, head);
                    // dP = dO · Vᵀ
                    let mut ds = vec![0f32; nq * nk];
                    let mut col = 0;
                    for &(ka, kb) in &tile.keys {
                        // SAFETY: in-bounds blocks of g and v; ds is local.
                        unsafe {
                            matmul(
                                (nq, kb - ka, d),
                                ds.as_mut_ptr().add(col),
                                nk,
                                false,
                                (g.as_ptr().add(q_tile), dims.q_rs(), 1),
                                (v.as_ptr().add(dims.kv_at(row, ka, kvh)), 1, dims.kv_rs()),
                                1.0,
                            );
                        }
                        col += kb - ka;
                    }
                    // dS = P ∘ (dP − rowsum(dO ∘ O))
                    for i in 0..nq {
                        let at = dims.q_at(row, tile.start + i, head);
                        let di: f32 = g[at..at + d]
                            .iter()
                            .zip(&o[at..at + d])
                            .map(|(a, b)| a * b)
                            .sum();
                        for (s, pij) in ds[i * nk..(i + 1) * nk].iter_mut().zip(&p[i * nk..]) {
                            *s = pij * (*s - di);
                        }
                    }
                    let mut col = 0;
                    for &(ka, kb) in &tile.keys {
                        let nkr = kb - ka;
                        // SAFETY: this task alone writes these dq rows of `head`; dk and dv
                        // are local; every block is in bounds.
                        unsafe {
                            matmul(
                                (nq, d, nkr),
                                dq_ptr.get().add(q_tile),
                                dims.q_rs(),
                                true,
                                (ds.as_ptr().add(col), nk, 1),
                                (k.as_ptr().add(dims.kv_at(row, ka, kvh)), dims.kv_rs(), 1),
                                self.scale,
                            );
                            matmul(
                                (nkr, d, nq),
                                dk.as_mut_ptr().add(ka * d),
                                d,
                                true,
                                (ds.as_ptr().add(col), 1, nk),
                                (q.as_ptr().add(q_tile), dims.q_rs(), 1),
                                self.scale,
                            );
                            matmul(
                                (nkr, d, nq),
                                dv.as_mut_ptr().add(ka * d),
                                d,
                                true,
                                (p.as_ptr().add(col), 1, nk),
                                (g.as_ptr().add(q_tile), dims.q_rs(), 1),
                                1.0,
                            );
                        }
                        col += nkr;
                    }
                }
                (dk, dv)
            })
            .collect();
        (dq, kv)
    }
}

/// Causal attention of `q` `[b, t, heads, d]` over `k`, `v` `[b, t, kv_heads, d]` (contiguous,
/// f32, CPU): token `i` attends to `j ≤ i` when `j`'s segment is 0 or `i`'s own; a padding token
/// ([`PAD_SEGMENT`]) attends to itself only. `segments` holds `b × t` ids. Returns
/// `[b, t, heads, d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, segments: Arc<Vec<u32>>) -> Result<Tensor> {
    let d = q.dim(3)?;
    attend(q, k, v, segments, d, None)
}

/// [`attention`] of `q` `[b·t, heads·d]` over `k`, `v` `[b·t, kv_heads·d]` — the same memory as
/// the four-dimensional form, without reshapes for the backward pass to carry — for `rows`
/// (`b`, `t`) and head size `d`. Returns `[b·t, heads·d]`.
pub fn attention_flat(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: Arc<Vec<u32>>,
    rows: (usize, usize),
    d: usize,
) -> Result<Tensor> {
    attend(q, k, v, segments, d, Some((rows.0, rows.1, d)))
}

fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: Arc<Vec<u32>>,
    d: usize,
    flat: Option<(usize, usize, usize)>,
) -> Result<Tensor> {
    let op = SegmentAttention {
        segments,
        scale: 1.0 / (d as f32).sqrt(),
        flat,
        lse: Mutex::new(Vec::new()),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNormOp {
    eps: f32,
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (data(xs, xl)?, data(ws, wl)?);
        let n = w.len();
        if n == 0 || x.len() % n != 0 {
            bail!("rms norm: weight of {n} for input {:?}", xl.shape());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
            let r = inv_rms(x, self.eps);
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(grad, |g| {
                    let n = w.len();
                    let mut dx = vec![0f32; x.len()];
                    // The weight's gradient sums over rows: partial sums over fixed blocks of
                    // rows, added in block order, so the result does not depend on how the
                    // threads happened to split the work (a run repeats bit for bit).
                    let block = RMS_NORM_BLOCK_ROWS * n;
                    let partials: Vec<Vec<f32>> = dx
                        .par_chunks_mut(block)
                        .zip(x.par_chunks(block).zip(g.par_chunks(block)))
                        .map(|(dx, (x, g))| {
                            let mut dw = vec![0f32; n];
                            for (dx, (x, g)) in dx.chunks_mut(n).zip(x.chunks(n).zip(g.chunks(n))) {
                                let r = inv_rms(x, self.eps);
                                let mut dot = 0.0;
                                for ((x, g), w) in x.iter().zip(g).zip(w) {
                                    dot += g * w * x * r;
                                }
                                let dot = dot / n as f32;
                                for (((dx, x), g), (dw, w)) in
                                    dx.iter_mut().zip(x).zip(g).zip(dw.iter_mut().zip(w))
                                {
                                    let xhat = x * r;
                                    *dx = r * (g * w - xhat * dot);
                                    *dw += g * xhat;
                                }
                            }
                            dw
                        })
                        .collect();
                    let mut dw = vec![0f32; n];
                    for part in &partials {
                        for (a, b) in dw.iter_mut().zip(part) {
                            *a += b;
                        }
                    }
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((
            Some(tensor_like(dx, x.shape(), x)?),
            Some(tensor_like(dw, w.shape(), w)?),
        ))
    }
}

/// Rows per block of the RMSNorm weight gradient's partial sums.
const RMS_NORM_BLOCK_ROWS: usize = 64;

/// RMSNorm over the last dimension: `x · rsqrt(mean(x²) + eps) · w` (f32, CPU).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNormOp { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// Rotary embeddings

/// Rotate-half rotary embedding of `[b, t, heads, d]` at per-token positions.
struct RopeOp {
    positions: Arc<Vec<u32>>,
    tables: Arc<RopeTables>,
}

/// Cos and sin of every position over half a head `[max_pos, d / 2]`.
#[derive(Debug)]
pub struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeTables {
    /// Tables from `cos` and `sin` `[max_pos, d]` (both halves equal, as rotate-half uses them).
    pub fn new(cos: &Tensor, sin: &Tensor) -> Result<Self> {
        let (positions, d) = cos.dims2()?;
        let half = d / 2;
        let take = |t: &Tensor| -> Result<Vec<f32>> {
            let all: Vec<f32> = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            Ok((0..positions)
                .flat_map(|p| all[p * d..p * d + half].to_vec())
                .collect())
        };
        Ok(Self {
            cos: take(cos)?,
            sin: take(sin)?,
            half,
        })
    }

    fn positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }
}

impl RopeOp {
    /// Heads per token of `[b, t, heads, d]`, or of `[b·t, heads·d]`.
    fn heads(&self, shape: &Shape) -> Result<usize> {
        let d = 2 * self.tables.half;
        let (tokens, heads, width) = match *shape.dims() {
            [b, t, heads, width] => (b * t, heads, width),
            [m, cols] if d > 0 && cols % d == 0 => (m, cols / d, d),
            _ => (0, 0, 0),
        };
        if width != d || self.positions.len() != tokens {
            bail!("rope: input {shape:?} does not match the tables");
        }
        Ok(heads)
    }

    /// Rotates each head of `src` into `dst` by `sign · angle`.
    fn rotate(&self, src: &[f32], dst: &mut [f32], heads: usize, sign: f32) -> Result<()> {
        let half = self.tables.half;
        let d = 2 * half;
        let limit = self.tables.positions();
        if let Some(p) = self.positions.iter().find(|&&p| p as usize >= limit) {
            bail!("rope: position {p} beyond the model's {limit}");
        }
        dst.par_chunks_mut(heads * d)
            .zip(src.par_chunks(heads * d))
            .zip(self.positions.par_iter())
            .for_each(|((dst, src), &p)| {
                let cos = &self.tables.cos[p as usize * half..][..half];
                let sin = &self.tables.sin[p as usize * half..][..half];
                for (dst, src) in dst.chunks_mut(d).zip(src.chunks(d)) {
                    let (x1, x2) = src.split_at(half);
                    let (y1, y2) = dst.split_at_mut(half);
                    for i in 0..half {
                        let (c, s) = (cos[i], sign * sin[i]);
                        y1[i] = x1[i] * c - x2[i] * s;
                        y2[i] = x2[i] * c + x1[i] * s;
                    }
                }
            });
        Ok(())
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = data(storage, layout)?;
        let heads = self.heads(layout.shape())?;
        let mut y = vec![0f32; x.len()];
        self.rotate(x, &mut y, heads, 1.0)?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let heads = self.heads(arg.shape())?;
        let dx = with_data(grad, |g| {
            let mut dx = vec![0f32; g.len()];
            self.rotate(g, &mut dx, heads, -1.0)?;
            Ok(dx)
        })?;
        Ok(Some(tensor_like(dx, arg.shape(), arg)?))
    }
}

/// Rotary embedding of `x` `[b, t, heads, d]` (or flat, `[b·t, heads·d]`) at `positions`
/// (`b × t`) with `tables`.
pub fn rope(x: &Tensor, positions: Arc<Vec<u32>>, tables: Arc<RopeTables>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(RopeOp { positions, tables })
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

struct SwigluOp;

impl CustomOp2 for SwigluOp {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (data(gs, gl)?, data(us, ul)?);
        if gate.len() != up.len() {
            bail!(
                "swiglu: gate {:?} and up {:?} differ",
                gl.shape(),
                ul.shape()
            );
        }
        Ok((CpuStorage::F32(swiglu_par(gate, up)), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_data(gate, |gate| {
            with_data(up, |up| {
                with_data(grad, |dy| Ok(swiglu_grad_par(gate, up, dy)))
            })
        })?;
        Ok((
            Some(tensor_like(dg, gate.shape(), gate)?),
            Some(tensor_like(du, up.shape(), up)?),
        ))
    }
}

/// `silu(g) · u` over whole buffers, on rayon's threads.
fn swiglu_par(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; gate.len()];
    y.par_chunks_mut(4096)
        .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
        .for_each(|(y, (g, u))| vexp::swiglu_into(y, g, u));
    y
}

/// The gradients of [`swiglu_par`] for the upstream gradient `dy`: `(d gate, d up)`.
fn swiglu_grad_par(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; gate.len()];
    let mut du = vec![0f32; gate.len()];
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
        .zip(dy.par_chunks(4096))
        .for_each(|(((dg, du), (g, u)), dy)| vexp::swiglu_grad_into(dg, du, g, u, dy));
    (dg, du)
}

/// `silu(gate) · up` (f32, CPU).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwigluOp)
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

/// Each target's log-probability from logits `[b, t, v]`: target `r·(t−1) + j` is the token
/// after position `j` of row `r`.
struct NextTokenLogProb {
    targets: Arc<Vec<u32>>,
    lse: Mutex<Vec<f32>>,
}

impl CustomOp1 for NextTokenLogProb {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = data(storage, layout)?;
        let rows = TargetRows::of(layout.shape())?;
        let v = rows.vocab;
        if self.targets.len() != rows.targets {
            bail!(
                "cross-entropy: {} targets for logits {:?}",
                self.targets.len(),
                layout.shape()
            );
        }
        if let Some(&bad) = self.targets.iter().find(|&&x| x as usize >= v) {
            bail!("cross-entropy: target {bad} outside the vocabulary of {v}");
        }
        let (lp, lse): (Vec<f32>, Vec<f32>) = (0..rows.targets)
            .into_par_iter()
            .map(|k| {
                let row = &logits[rows.row_of(k) * v..][..v];
                let max = vexp::max(row);
                let lse = max + vexp::sum_exp(row, max).ln();
                (row[self.targets[k] as usize] - lse, lse)
            })
            .unzip();
        if let Ok(mut saved) = self.lse.lock() {
            *saved = lse;
        }
        Ok((CpuStorage::F32(lp), Shape::from(rows.targets)))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let lse = match self.lse.lock() {
            Ok(l) => l.clone(),
            Err(_) => bail!("cross-entropy: saved state poisoned"),
        };
        let rows = TargetRows::of(logits.shape())?;
        let v = rows.vocab;
        let dl = with_data(logits, |x| {
            with_data(grad, |g| {
                let mut dl = vec![0f32; x.len()];
                dl.par_chunks_mut(v).enumerate().for_each(|(pos, out)| {
                    let Some(k) = rows.target_of(pos) else {
                        return;
                    };
                    let gk = g[k];
                    if gk == 0.0 {
                        return;
                    }
                    vexp::scaled_exp_into(out, &x[pos * v..][..v], lse[k], -gk);
                    out[self.targets[k] as usize] += gk;
                });
                Ok(dl)
            })
        })?;
        Ok(Some(tensor_like(dl, logits.shape(), logits)?))
    }
}

/// The row of flattened `[b·t, …]` states that next-token target `k` of `b·(t−1)` follows.
pub fn next_token_row(k: usize, t: usize) -> usize {
    k / (t - 1) * t + k % (t - 1)
}

/// Which logits row each target is scored on: `[b, t, v]` logits give `b·(t−1)` next-token
/// targets (target `r·(t−1) + j` after position `j` of row `r`, the last position unused);
/// `[n, v]` logits give `n` targets, one per row.
#[derive(Debug, Clone, Copy)]
struct TargetRows {
    /// Positions per row, for `[b, t, v]`; `None` for `[n, v]`.
    t: Option<usize>,
    targets: usize,
    vocab: usize,
}

impl TargetRows {
    fn of(shape: &Shape) -> Result<Self> {
        match *shape.dims() {
            [b, t, v] if t >= 2 => Ok(Self {
                t: Some(t),
                targets: b * (t - 1),
                vocab: v,
            }),
            [n, v] => Ok(Self {
                t: None,
                targets: n,
                vocab: v,
            }),
            _ => bail!("cross-entropy: logits {shape:?} are neither [b, t ≥ 2, v] nor [n, v]"),
        }
    }

    fn row_of(&self, k: usize) -> usize {
        match self.t {
            Some(t) => next_token_row(k, t),
            None => k,
        }
    }

    fn target_of(&self, pos: usize) -> Option<usize> {
        match self.t {
            Some(t) => (pos % t != t - 1).then(|| pos / t * (t - 1) + pos % t),
            None => Some(pos),
        }
    }
}

/// Log-probability `[b·(t−1)]` of each next token `targets` under `logits` `[b, t, v]` (f32,
/// CPU), differentiable in the logits; target `r·(t−1) + j` follows position `j` of row `r`.
/// Logits `[n, v]` instead score `targets[k]` on row `k` (logits computed only where trained).
pub fn next_token_log_probs(logits: &Tensor, targets: Arc<Vec<u32>>) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(NextTokenLogProb {
        targets,
        lse: Mutex::new(Vec::new()),
    })
}

// ---------------------------------------------------------------------------------------------
// Dropout

/// `x · keep / (1 − p)` with the keep flags held as bytes: no mask tensor and no gradient for
/// one.
struct DropoutOp {
    keep: Vec<bool>,
    scale: f32,
}

impl DropoutOp {
    fn apply(&self, x: &[f32]) -> Result<Vec<f32>> {
        if x.len() != self.keep.len() {
            bail!("dropout: {} flags for {} values", self.keep.len(), x.len());
        }
        Ok(x.iter()
            .zip(&self.keep)
            .map(|(v, &k)| if k { v * self.scale } else { 0.0 })
            .collect())
    }
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.apply(data(storage, layout)?)?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_data(grad, |g| self.apply(g))?;
        Ok(Some(tensor_like(dx, arg.shape(), arg)?))
    }
}

/// Inverted dropout of `x` (f32, CPU): elements whose `keep` flag is false become 0, the others
/// are scaled by 1 / (1 − p).
pub fn dropout(x: &Tensor, keep: Vec<bool>, p: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op1(DropoutOp {
        keep,
        scale: 1.0 / (1.0 - p),
    })
}

// ---------------------------------------------------------------------------------------------
// Linear with a frozen weight

/// `x · Wᵀ` for a weight that gets no gradient.
struct FrozenLinear {
    /// `[out, in]`, contiguous f32 on the CPU.
    weight: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = data(storage, layout)?;
        let (out_dim, in_dim) = self.weight.dims2()?;
        let dims = layout.shape().dims();
        if dims.last() != Some(&in_dim) {
            bail!(
                "linear: input {:?} for a weight [{out_dim}, {in_dim}]",
                layout.shape()
            );
        }
        let m = x.len() / in_dim;
        let mut y = vec![0f32; m * out_dim];
        with_data(&self.weight, |w| {
            // SAFETY: x is m×in, w is out×in (read transposed), y is m×out.
            unsafe { matmul_par((m, out_dim, in_dim), &mut y, false, x, false, w, true, 1.0) };
            Ok(())
        })?;
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out_dim;
        }
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let out_dim = self.weight.dim(0)?;
        let m = grad.elem_count() / out_dim;
        let dx = grad.reshape((m, out_dim))?.matmul(&self.weight)?;
        Ok(Some(dx.reshape(arg.shape())?))
    }
}

/// `dst (m×n) = [dst +] alpha · A · B` over whole row-major matrices, `A` read as given or
/// transposed, `B` likewise, on rayon's threads.
///
/// # Safety
/// The slices must hold the shapes given.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_par(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    a_transposed: bool,
    b: &[f32],
    b_transposed: bool,
    alpha: f32,
) {
    debug_assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    let (a_rs, a_cs) = if a_transposed { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if b_transposed { (1, k) } else { (n, 1) };
    // SAFETY: the shapes are the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// A frozen linear layer with a LoRA adapter in one op: `x·Wᵀ + s·(d(x)·Aᵀ)·Bᵀ`, where `d` is
/// the adapter's dropout (or nothing). Only `x`, `A` and `B` get gradients; no intermediate
/// tensor is kept but the `m × rank` product, recomputed in the backward pass.
struct LoraLinear {
    /// `[out, in]`, frozen.
    weight: Tensor,
    scale: f32,
    /// Dropout keep flags over `x`, and the kept values' scale.
    dropout: Option<(Vec<bool>, f32)>,
}

impl LoraLinear {
    /// The adapter's input: `x` after dropout.
    fn adapter_input<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.dropout {
            None => std::borrow::Cow::Borrowed(x),
            Some((keep, s)) => std::borrow::Cow::Owned(
                x.iter()
                    .zip(keep)
                    .map(|(v, &k)| if k { v * s } else { 0.0 })
                    .collect(),
            ),
        }
    }

    fn dims(&self, x: &Layout, a: &Layout, b: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let (rank, a_in) = a.shape().dims2()?;
        let (b_out, b_rank) = b.shape().dims2()?;
        let (m, x_in) = x.shape().dims2()?;
        if (a_in, b_out, b_rank, x_in) != (in_dim, out_dim, rank, in_dim) {
            bail!(
                "lora linear: x {:?}, A {:?}, B {:?} for a weight [{out_dim}, {in_dim}]",
                x.shape(),
                a.shape(),
                b.shape()
            );
        }
        if self
            .dropout
            .as_ref()
            .is_some_and(|(k, _)| k.len() != m * in_dim)
        {
            bail!("lora linear: dropout flags do not match x {:?}", x.shape());
        }
        Ok((m, in_dim, out_dim, rank))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, in_dim, out_dim, rank) = self.dims(xl, al, bl)?;
        let (x, a, b) = (data(xs, xl)?, data(as_, al)?, data(bs, bl)?);
        let mut y = vec![0f32; m * out_dim];
        let mut u = vec![0f32; m * rank];
        let xd = self.adapter_input(x);
        with_data(&self.weight, |w| {
            // SAFETY: x is m×in, w out×in, a rank×in, b out×rank, u m×rank, y m×out.
            unsafe {
                matmul_par((m, out_dim, in_dim), &mut y, false, x, false, w, true, 1.0);
                matmul_par((m, rank, in_dim), &mut u, false, &xd, false, a, true, 1.0);
                matmul_par(
                    (m, out_dim, rank),
                    &mut y,
                    true,
                    &u,
                    false,
                    b,
                    true,
                    self.scale,
                );
            }
            Ok(())
        })?;
        Ok((CpuStorage::F32(y), Shape::from((m, out_dim))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, in_dim, out_dim, rank) = self.dims(
            x.layout(),
            &Layout::contiguous(a.shape()),
            &Layout::contiguous(b.shape()),
        )?;
        // The input's gradient is the costly product (`m × in × out`); a LoRA adapter on the first
        // layer reads the frozen embedding's output, which nothing asks the gradient of.
        let want_dx = x.track_op();
        let (dx, da, db) = with_data(x, |x| {
            with_data(a, |a| {
                with_data(b, |b| {
                    with_data(grad, |g| {
                        with_data(&self.weight, |w| {
                            let xd = self.adapter_input(x);
                            let mut u = vec![0f32; m * rank];
                            let mut gu = vec![0f32; m * rank];
                            let mut da = vec![0f32; rank * in_dim];
                            let mut db = vec![0f32; out_dim * rank];
                            // SAFETY: shapes as in the forward pass.
                            unsafe {
                                matmul_par(
                                    (m, rank, in_dim),
                                    &mut u,
                                    false,
                                    &xd,
                                    false,
                                    a,
                                    true,
                                    1.0,
                                );
                                // gu = s · g · B
                                matmul_par(
                                    (m, rank, out_dim),
                                    &mut gu,
                                    false,
                                    g,
                                    false,
                                    b,
                                    false,
                                    self.scale,
                                );
                                // dA = guᵀ · d(x); dB = s · gᵀ · u
                                matmul_par(
                                    (rank, in_dim, m),
                                    &mut da,
                                    false,
                                    &gu,
                                    true,
                                    &xd,
                                    false,
                                    1.0,
                                );
                                matmul_par(
                                    (out_dim, rank, m),
                                    &mut db,
                                    false,
                                    g,
                                    true,
                                    &u,
                                    false,
                                    self.scale,
                                );
                            }
                            if !want_dx {
                                return Ok((None, da, db));
                            }
                            let mut dx = vec![0f32; m * in_dim];
                            // SAFETY: as above.
                            unsafe {
                                // dx = g · W + d(gu · A): without dropout the adapter's part
                                // accumulates straight into dx.
                                matmul_par(
                                    (m, in_dim, out_dim),
                                    &mut dx,
                                    false,
                                    g,
                                    false,
                                    w,
                                    false,
                                    1.0,
                                );
                                if self.dropout.is_none() {
                                    matmul_par(
                                        (m, in_dim, rank),
                                        &mut dx,
                                        true,
                                        &gu,
                                        false,
                                        a,
                                        false,
                                        1.0,
                                    );
                                } else {
                                    let mut dxd = vec![0f32; m * in_dim];
                                    matmul_par(
                                        (m, in_dim, rank),
                                        &mut dxd,
                                        false,
                                        &gu,
                                        false,
                                        a,
                                        false,
                                        1.0,
                                    );
                                    let dxd = self.adapter_input(&dxd);
                                    for (d, e) in dx.iter_mut().zip(dxd.iter()) {
                                        *d += e;
                                    }
                                }
                            }
                            Ok((Some(dx), da, db))
                        })
                    })
                })
            })
        })?;
        Ok((
            dx.map(|dx| tensor_like(dx, x.shape(), x)).transpose()?,
            Some(tensor_like(da, a.shape(), a)?),
            Some(tensor_like(db, b.shape(), b)?),
        ))
    }
}

/// A frozen linear layer with its LoRA adapter, `x·Wᵀ + scale·(dropout(x)·Aᵀ)·Bᵀ`, for `x`
/// `[m, in]`, `W` `[out, in]`, `A` `[rank, in]`, `B` `[out, rank]` (f32, CPU); `keep` holds the
/// dropout's flags over `x` and `p` its rate.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    (a, b, scale): (&Tensor, &Tensor, f64),
    dropout: Option<(Vec<bool>, f32)>,
) -> Result<Tensor> {
    let op = LoraLinear {
        weight: weight.detach().contiguous()?,
        scale: scale as f32,
        dropout: dropout.map(|(keep, p)| (keep, 1.0 / (1.0 - p))),
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// `x · Wᵀ` over the last dimension of `x` for a weight `[out, in]` that is not trained: the
/// backward pass computes the input's gradient only.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let weight = weight.detach().contiguous()?;
    x.contiguous()?.apply_op1(FrozenLinear { weight })
}

// ---------------------------------------------------------------------------------------------
// Trained projections

/// `x · Wᵀ` for a weight that is trained: both gradients come out of two products straight into
/// their own layouts (no transposed weight view for candle to accumulate through).
struct TrainedLinear;

impl CustomOp2 for TrainedLinear {
    fn name(&self) -> &'static str {
        "trained-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (data(xs, xl)?, data(ws, wl)?);
        let (m, in_dim) = xl.shape().dims2()?;
        let (out_dim, w_in) = wl.shape().dims2()?;
        if w_in != in_dim {
            bail!(
                "linear: input {:?} for a weight {:?}",
                xl.shape(),
                wl.shape()
            );
        }
        let mut y = vec![0f32; m * out_dim];
        // SAFETY: x is m×in, w is out×in (read transposed), y is m×out.
        unsafe { matmul_par((m, out_dim, in_dim), &mut y, false, x, false, w, true, 1.0) };
        Ok((CpuStorage::F32(y), Shape::from((m, out_dim))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, in_dim) = x.dims2()?;
        let out_dim = w.dim(0)?;
        let (dx, dw) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(grad, |dy| {
                    let mut dx = vec![0f32; m * in_dim];
                    let mut dw = vec![0f32; out_dim * in_dim];
                    // SAFETY: dy is m×out, w out×in, x m×in.
                    unsafe {
                        matmul_par(
                            (m, in_dim, out_dim),
                            &mut dx,
                            false,
                            dy,
                            false,
                            w,
                            false,
                            1.0,
                        );
                        matmul_par(
                            (out_dim, in_dim, m),
                            &mut dw,
                            false,
                            dy,
                            true,
                            x,
                            false,
                            1.0,
                        );
                    }
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((
            Some(tensor_like(dx, x.shape(), x)?),
            Some(tensor_like(dw, w.shape(), w)?),
        ))
    }
}

/// `x · Wᵀ` for `x` `[m, in]` and a trained weight `[out, in]` (f32, CPU).
pub fn trained_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, TrainedLinear)
}

/// The MLP's first half in one op: `silu(x · Gᵀ) · (x · Uᵀ)`. The two projections are kept
/// for the backward pass inside the op (the same memory the composite graph holds as the
/// SwiGLU's inputs), so no gate-, up- or input-sized gradient passes through candle's
/// accumulation; the weights' gradients are computed only when they are trained.
struct GatedUp {
    train_weights: bool,
    /// `x · Gᵀ` and `x · Uᵀ` from the forward pass, taken by the backward one.
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
    keep: bool,
}

impl GatedUp {
    fn dims(x: &Layout, g: &Layout, u: &Layout) -> Result<(usize, usize, usize)> {
        let (m, hid) = x.shape().dims2()?;
        let (inter, g_in) = g.shape().dims2()?;
        if g_in != hid || u.shape().dims() != [inter, hid] {
            bail!(
                "gated up: x {:?}, gate {:?}, up {:?}",
                x.shape(),
                g.shape(),
                u.shape()
            );
        }
        Ok((m, hid, inter))
    }

    /// `x · Gᵀ` and `x · Uᵀ`.
    fn project(
        x: &[f32],
        g: &[f32],
        u: &[f32],
        (m, hid, inter): (usize, usize, usize),
    ) -> (Vec<f32>, Vec<f32>) {
        let mut gate = vec![0f32; m * inter];
        let mut up = vec![0f32; m * inter];
        // SAFETY: x is m×hid, g and u inter×hid (read transposed).
        unsafe {
            matmul_par((m, inter, hid), &mut gate, false, x, false, g, true, 1.0);
            matmul_par((m, inter, hid), &mut up, false, x, false, u, true, 1.0);
        }
        (gate, up)
    }
}

impl CustomOp3 for GatedUp {
    fn name(&self) -> &'static str {
        "gated-up"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Self::dims(xl, gl, ul)?;
        let (gate, up) = Self::project(data(xs, xl)?, data(gs, gl)?, data(us, ul)?, dims);
        let y = swiglu_par(&gate, &up);
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((gate, up));
        }
        Ok((CpuStorage::F32(y), Shape::from((dims.0, dims.2))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, hid) = x.dims2()?;
        let inter = g.dim(0)?;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let grads = with_data(x, |x| {
            with_data(g, |gw| {
                with_data(u, |uw| {
                    with_data(grad, |dy| {
                        let (gate, up) = match saved {
                            Some(s) => s,
                            None => Self::project(x, gw, uw, (m, hid, inter)),
                        };
                        let (dg, du) = swiglu_grad_par(&gate, &up, dy);
                        drop((gate, up));
                        let mut dx = vec![0f32; m * hid];
                        // SAFETY: dg and du are m×inter, the weights inter×hid, x m×hid.
                        unsafe {
                            matmul_par((m, hid, inter), &mut dx, false, &dg, false, gw, false, 1.0);
                            matmul_par((m, hid, inter), &mut dx, true, &du, false, uw, false, 1.0);
                        }
                        let weights = self.train_weights.then(|| {
                            let mut dgw = vec![0f32; inter * hid];
                            let mut duw = vec![0f32; inter * hid];
                            // SAFETY: as above.
                            unsafe {
                                matmul_par(
                                    (inter, hid, m),
                                    &mut dgw,
                                    false,
                                    &dg,
                                    true,
                                    x,
                                    false,
                                    1.0,
                                );
                                matmul_par(
                                    (inter, hid, m),
                                    &mut duw,
                                    false,
                                    &du,
                                    true,
                                    x,
                                    false,
                                    1.0,
                                );
                            }
                            (dgw, duw)
                        });
                        Ok((dx, weights))
                    })
                })
            })
        })?;
        let (dx, weights) = grads;
        let (dgw, duw) = match weights {
            Some((dgw, duw)) => (
                Some(tensor_like(dgw, g.shape(), g)?),
                Some(tensor_like(duw, u.shape(), u)?),
            ),
            None => (None, None),
        };
        Ok((Some(tensor_like(dx, x.shape(), x)?), dgw, duw))
    }
}

/// `silu(x · Gᵀ) · (x · Uᵀ)` for `x` `[m, hidden]` and weights `[intermediate, hidden]` (f32,
/// CPU); the weights get gradients when `train_weights`.
pub fn gated_up(x: &Tensor, gate: &Tensor, up: &Tensor, train_weights: bool) -> Result<Tensor> {
    let keep = x.track_op() || (train_weights && (gate.track_op() || up.track_op()));
    let (gate, up) = if train_weights {
        (gate.contiguous()?, up.contiguous()?)
    } else {
        (gate.detach().contiguous()?, up.detach().contiguous()?)
    };
    let op = GatedUp {
        train_weights,
        saved: Mutex::new(None),
        keep,
    };
    x.contiguous()?.apply_op3(&gate, &up, op)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::train::model::{Mask, attention_mask};
    use candle_core::{D, DType, Device, Var};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// Largest absolute difference between two tensors of the same shape.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Gradients of `sum(f(inputs) · r)` for a fixed random `r`, one per input.
    fn grads(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts);
        let r = random(out.dims(), 99);
        let loss = (&out * &r).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let gs = vars
            .iter()
            .map(|v| g.get(v.as_tensor()).expect("a gradient").clone())
            .collect();
        (out.detach(), gs)
    }

    fn assert_close(name: &str, a: &Tensor, b: &Tensor, tol: f32) {
        let d = max_diff(a, b);
        assert!(d <= tol, "{name}: max difference {d} > {tol}");
    }

    /// Rows of 150 tokens: a prefix, two instructions and padding; a prefix and one long
    /// instruction crossing query tiles; no prefix and three short segments.
    fn segments() -> Vec<Vec<u32>> {
        let mut a = vec![0u32; 5];
        a.extend(std::iter::repeat_n(1, 80));
        a.extend(std::iter::repeat_n(2, 40));
        a.extend(std::iter::repeat_n(PAD_SEGMENT, 25));
        let mut b = vec![0u32; 3];
        b.extend(std::iter::repeat_n(7, 147));
        let mut c = vec![3u32; 50];
        c.extend(std::iter::repeat_n(4, 50));
        c.extend(std::iter::repeat_n(5, 50));
        vec![a, b, c]
    }

    /// Attention composed from candle ops over `[b, t, heads, d]` inputs.
    fn composite_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
        let (b, t, h, d) = q.dims4().unwrap();
        let kvh = k.dim(2).unwrap();
        let groups = h / kvh;
        let heads_first = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
        let repeat = |x: Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .expand((b, kvh, groups, t, d))
                .unwrap()
                .reshape((b, h, t, d))
                .unwrap()
        };
        let (q, k, v) = (
            heads_first(q),
            repeat(heads_first(k)),
            repeat(heads_first(v)),
        );
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt())
            .unwrap()
            .broadcast_add(mask)
            .unwrap();
        let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    }

    #[test]
    fn attention_over_segments_equals_the_masked_composite_with_gradients() {
        let segs = segments();
        let t = 150;
        let mask = attention_mask(&segs, t, &Device::Cpu).unwrap();
        let Mask::Segments { ids, .. } = &mask else {
            panic!("segment mask expected")
        };
        let additive = mask.additive(&Device::Cpu).unwrap();
        let inputs = [
            random(&[3, t, 4, 8], 1),
            random(&[3, t, 2, 8], 2),
            random(&[3, t, 2, 8], 3),
        ];
        let (fused, fg) = grads(&inputs, |x| {
            attention(&x[0], &x[1], &x[2], ids.clone()).unwrap()
        });
        let (comp, cg) = grads(&inputs, |x| {
            composite_attention(&x[0], &x[1], &x[2], &additive)
        });
        assert_close("output", &fused, &comp, 1e-5);
        for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(fg.iter().zip(&cg)) {
            assert_close(name, a, b, 1e-5);
        }
        // The flat form, `[b·t, heads·d]`, is the same memory and gives the same numbers.
        let flat: Vec<Tensor> = inputs
            .iter()
            .map(|x| x.flatten_to(1).unwrap().flatten_from(1).unwrap())
            .collect();
        let (flat_out, flat_g) = grads(&flat, |x| {
            attention_flat(&x[0], &x[1], &x[2], ids.clone(), (3, t), 8).unwrap()
        });
        assert_eq!(flat_out.dims(), &[3 * t, 32]);
        assert_close(
            "flat output",
            &flat_out.reshape(fused.shape()).unwrap(),
            &comp,
            1e-5,
        );
        for (name, (a, b)) in ["flat dq", "flat dk", "flat dv"]
            .iter()
            .zip(flat_g.iter().zip(&cg))
        {
            assert_close(name, &a.reshape(b.shape()).unwrap(), b, 1e-5);
        }
        let wrong_rows = attention_flat(&flat[0], &flat[1], &flat[2], ids.clone(), (2, t), 8);
        assert!(wrong_rows.is_err());
    }

    #[test]
    fn rms_norm_equals_the_composite_with_gradients() {
        let inputs = [random(&[3, 5, 16], 4), random(&[16], 5)];
        let eps = 1e-5;
        let (fused, fg) = grads(&inputs, |x| rms_norm(&x[0], &x[1], eps).unwrap());
        let (comp, cg) = grads(&inputs, |x| {
            let norm = (x[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
                .unwrap()
                .sqrt()
                .unwrap();
            x[0].broadcast_div(&norm)
                .unwrap()
                .broadcast_mul(&x[1])
                .unwrap()
        });
        assert_close("output", &fused, &comp, 1e-5);
        assert_close("dx", &fg[0], &cg[0], 1e-5);
        assert_close("dw", &fg[1], &cg[1], 1e-5);
    }

    #[test]
    fn rope_equals_rotate_half_with_gradients() {
        let (b, t, h, d, max_pos) = (2, 6, 3, 8, 20);
        let half = d / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let emb: Vec<f32> = (0..max_pos)
            .flat_map(|p| {
                let row: Vec<f32> = inv.iter().map(|f| p as f32 * f).collect();
                [row.clone(), row].concat()
            })
            .collect();
        let emb = Tensor::from_vec(emb, (max_pos, d), &Device::Cpu).unwrap();
        let (cos, sin) = (emb.cos().unwrap(), emb.sin().unwrap());
        let tables = Arc::new(RopeTables::new(&cos, &sin).unwrap());
        let positions: Vec<u32> = vec![0, 1, 2, 3, 4, 5, 0, 1, 2, 7, 8, 19];
        let pos = Tensor::from_vec(positions.clone(), b * t, &Device::Cpu).unwrap();
        let inputs = [random(&[b, t, h, d], 6)];
        let (fused, fg) = grads(&inputs, |x| {
            rope(&x[0], Arc::new(positions.clone()), tables.clone()).unwrap()
        });
        let (comp, cg) = grads(&inputs, |x| {
            let c = cos
                .index_select(&pos, 0)
                .unwrap()
                .reshape((b, t, 1, d))
                .unwrap();
            let s = sin
                .index_select(&pos, 0)
                .unwrap()
                .reshape((b, t, 1, d))
                .unwrap();
            let x1 = x[0].narrow(D::Minus1, 0, half).unwrap();
            let x2 = x[0].narrow(D::Minus1, half, half).unwrap();
            let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
            (x[0].broadcast_mul(&c).unwrap() + rot.broadcast_mul(&s).unwrap()).unwrap()
        });
        assert_close("output", &fused, &comp, 1e-5);
        assert_close("dx", &fg[0], &cg[0], 1e-5);
        let flat = [inputs[0].reshape((b * t, h * d)).unwrap()];
        let (flat_out, flat_g) = grads(&flat, |x| {
            rope(&x[0], Arc::new(positions.clone()), tables.clone()).unwrap()
        });
        assert_close(
            "flat output",
            &flat_out.reshape(comp.shape()).unwrap(),
            &comp,
            1e-5,
        );
        assert_close(
            "flat dx",
            &flat_g[0].reshape(comp.shape()).unwrap(),
            &cg[0],
            1e-5,
        );
        let too_far = Arc::new(vec![max_pos as u32; b * t]);
        assert!(rope(&inputs[0], too_far, tables).is_err());
    }

    #[test]
    fn swiglu_equals_the_composite_with_gradients() {
        let inputs = [random(&[3, 7, 20], 7), random(&[3, 7, 20], 8)];
        let (fused, fg) = grads(&inputs, |x| swiglu(&x[0], &x[1]).unwrap());
        let (comp, cg) = grads(&inputs, |x| (x[0].silu().unwrap() * &x[1]).unwrap());
        assert_close("output", &fused, &comp, 1e-5);
        assert_close("dgate", &fg[0], &cg[0], 1e-5);
        assert_close("dup", &fg[1], &cg[1], 1e-5);
    }

    #[test]
    fn next_token_log_probs_equal_log_softmax_and_gather_with_gradients() {
        let (b, t, v) = (2, 9, 33);
        let targets: Vec<u32> = (0..b * (t - 1)).map(|i| (i * 7 % v) as u32).collect();
        let target_t = Tensor::from_vec(targets.clone(), b * (t - 1), &Device::Cpu).unwrap();
        let inputs = [(random(&[b, t, v], 9) * 4.0).unwrap()];
        let (fused, fg) = grads(&inputs, |x| {
            next_token_log_probs(&x[0], Arc::new(targets.clone())).unwrap()
        });
        let (comp, cg) = grads(&inputs, |x| {
            let logits = x[0]
                .narrow(1, 0, t - 1)
                .unwrap()
                .reshape((b * (t - 1), v))
                .unwrap();
            candle_nn::ops::log_softmax(&logits, D::Minus1)
                .unwrap()
                .gather(&target_t.unsqueeze(1).unwrap(), 1)
                .unwrap()
                .squeeze(1)
                .unwrap()
        });
        assert_close("log-probs", &fused, &comp, 1e-5);
        assert_close("dlogits", &fg[0], &cg[0], 1e-5);
        // Logits [n, v]: one target per row, no shift.
        let (flat, flat_g) = grads(&inputs, |x| {
            let rows = x[0]
                .narrow(1, 0, t - 1)
                .unwrap()
                .reshape((b * (t - 1), v))
                .unwrap();
            next_token_log_probs(&rows, Arc::new(targets.clone())).unwrap()
        });
        assert_close("log-probs of [n, v]", &flat, &comp, 1e-5);
        assert_close("dlogits of [n, v]", &flat_g[0], &cg[0], 1e-5);
        assert!(next_token_log_probs(&inputs[0], Arc::new(vec![v as u32; b * (t - 1)])).is_err());
    }

    #[test]
    fn dropout_equals_a_mask_multiply_with_gradients() {
        let inputs = [random(&[4, 9], 12)];
        let keep: Vec<bool> = (0..36).map(|i| i % 3 != 0).collect();
        let mask: Vec<f32> = keep
            .iter()
            .map(|&k| if k { 1.0 / 0.75 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (4, 9), &Device::Cpu).unwrap();
        let (fused, fg) = grads(&inputs, |x| dropout(&x[0], keep.clone(), 0.25).unwrap());
        let (comp, cg) = grads(&inputs, |x| (&x[0] * &mask).unwrap());
        assert_close("output", &fused, &comp, 1e-6);
        assert_close("dx", &fg[0], &cg[0], 1e-6);
        assert!(dropout(&inputs[0], vec![true; 3], 0.25).is_err());
    }

    #[test]
    fn a_lora_linear_equals_base_plus_adapter_with_gradients() {
        let w = random(&[12, 10], 13);
        let inputs = [
            random(&[6, 10], 14),
            random(&[3, 10], 15),
            random(&[12, 3], 16),
        ];
        let keep: Vec<bool> = (0..60).map(|i| i % 4 != 1).collect();
        let mask: Vec<f32> = keep
            .iter()
            .map(|&k| if k { 1.0 / 0.8 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (6, 10), &Device::Cpu).unwrap();
        for dropout in [None, Some((keep.clone(), 0.2f32))] {
            let with_mask = dropout.is_some();
            let (fused, fg) = grads(&inputs, |x| {
                lora_linear(&x[0], &w, (&x[1], &x[2], 2.0), dropout.clone()).unwrap()
            });
            let (comp, cg) = grads(&inputs, |x| {
                let xd = if with_mask {
                    (&x[0] * &mask).unwrap()
                } else {
                    x[0].clone()
                };
                let base = x[0].matmul(&w.t().unwrap()).unwrap();
                let update = xd
                    .matmul(&x[1].t().unwrap())
                    .unwrap()
                    .matmul(&x[2].t().unwrap())
                    .unwrap();
                (base + (update * 2.0).unwrap()).unwrap()
            });
            assert_close("output", &fused, &comp, 1e-5);
            for (name, (a, b)) in ["dx", "dA", "dB"].iter().zip(fg.iter().zip(&cg)) {
                assert_close(name, a, b, 1e-5);
            }
        }
    }

    #[test]
    fn a_lora_linear_on_an_untracked_input_still_trains_its_adapter() {
        // The first layer's adapters read the frozen embedding: no input gradient is asked for,
        // and the adapter's gradients must be those of the tracked case.
        let w = random(&[12, 10], 13);
        let x = random(&[6, 10], 14);
        let inputs = [x.clone(), random(&[3, 10], 15), random(&[12, 3], 16)];
        let (_, tracked) = grads(&inputs, |v| {
            lora_linear(&v[0], &w, (&v[1], &v[2], 2.0), None).unwrap()
        });
        let (a, b) = (
            Var::from_tensor(&inputs[1]).unwrap(),
            Var::from_tensor(&inputs[2]).unwrap(),
        );
        let out = lora_linear(&x, &w, (a.as_tensor(), b.as_tensor(), 2.0), None).unwrap();
        let r = random(out.dims(), 99);
        let g = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            g.get(&x).is_none(),
            "no gradient for an input nothing trains through"
        );
        assert_close("dA", g.get(a.as_tensor()).unwrap(), &tracked[1], 1e-6);
        assert_close("dB", g.get(b.as_tensor()).unwrap(), &tracked[2], 1e-6);
    }

    #[test]
    fn a_trained_linear_equals_a_matmul_with_gradients() {
        let inputs = [random(&[30, 10], 21), random(&[12, 10], 22)];
        let (fused, fg) = grads(&inputs, |x| trained_linear(&x[0], &x[1]).unwrap());
        let (comp, cg) = grads(&inputs, |x| x[0].matmul(&x[1].t().unwrap()).unwrap());
        assert_close("output", &fused, &comp, 1e-5);
        assert_close("dx", &fg[0], &cg[0], 1e-5);
        assert_close("dw", &fg[1], &cg[1], 1e-5);
        assert!(trained_linear(&inputs[0], &random(&[12, 9], 23)).is_err());
    }

    #[test]
    fn gated_up_equals_two_projections_and_swiglu_with_gradients() {
        let inputs = [
            random(&[30, 24], 31),
            random(&[40, 24], 32),
            random(&[40, 24], 33),
        ];
        let composite = |x: &[Tensor]| {
            let g = x[0].matmul(&x[1].t().unwrap()).unwrap();
            let u = x[0].matmul(&x[2].t().unwrap()).unwrap();
            (g.silu().unwrap() * u).unwrap()
        };
        let (fused, fg) = grads(&inputs, |x| gated_up(&x[0], &x[1], &x[2], true).unwrap());
        let (comp, cg) = grads(&inputs, composite);
        assert_close("output", &fused, &comp, 1e-5);
        for (name, (a, b)) in ["dx", "dgate", "dup"].iter().zip(fg.iter().zip(&cg)) {
            assert_close(name, a, b, 1e-5);
        }
        // Frozen weights: the input's gradient only, the same one.
        let (g, u) = (
            Var::from_tensor(&inputs[1]).unwrap(),
            Var::from_tensor(&inputs[2]).unwrap(),
        );
        let x = Var::from_tensor(&inputs[0]).unwrap();
        let r = random(&[30, 40], 99);
        let y = gated_up(x.as_tensor(), g.as_tensor(), u.as_tensor(), false).unwrap();
        let store = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(store.get(g.as_tensor()).is_none() && store.get(u.as_tensor()).is_none());
        assert_close("frozen dx", store.get(x.as_tensor()).unwrap(), &cg[0], 1e-5);
        // Without a graph nothing is kept for a backward pass that will not come.
        let plain = gated_up(&inputs[0], &inputs[1], &inputs[2], false).unwrap();
        assert_close("untracked output", &plain, &comp, 1e-5);
    }

    #[test]
    fn a_frozen_linear_gives_the_input_gradient_only() {
        let w = random(&[12, 10], 10);
        let inputs = [random(&[3, 4, 10], 11)];
        let (fused, fg) = grads(&inputs, |x| frozen_linear(&x[0], &w).unwrap());
        let (comp, cg) = grads(&inputs, |x| x[0].broadcast_matmul(&w.t().unwrap()).unwrap());
        assert_close("output", &fused, &comp, 1e-5);
        assert_close("dx", &fg[0], &cg[0], 1e-5);
        // The weight is no variable and the op's backward computes nothing for it.
        let x = Var::from_tensor(&inputs[0]).unwrap();
        let y = frozen_linear(x.as_tensor(), &w).unwrap().sum_all().unwrap();
        let g = y.backward().unwrap();
        assert!(g.get(&w).is_none());
        assert_eq!(fused.dtype(), DType::F32);
    }
}
