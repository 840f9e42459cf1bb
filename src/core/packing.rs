//! Packing instructions into training rows, in the four variants of the MoI paper:
//! `seq` (one conversation a row), `concat` (natural mixture, packed), `balanced` (balanced
//! sampling, packed) and `moi` (balanced chunks of one instruction per task, the default system
//! prompt first in every row).
//!
//! Packing is planned on lengths alone (fast enough for millions of samples), then rows are built
//! from token ids only when someone needs them: the trainer a batch at a time, the preview a few.

use std::collections::BTreeSet;
use std::ops::Range;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::core::sampling::SampleRef;
pub use crate::core::settings::{AttentionLayout, Overlong, PackMode, PackSettings};

/// Label value for tokens that are not trained.
pub const IGNORE_INDEX: i32 = -100;

/// Lengths the planner needs of a tokenized sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SampleInfo {
    /// Tokens in the sample.
    pub len: u32,
    /// Tokens with a label.
    pub trained: u32,
    /// Tokens of its system block (dropped when it opens a row answered under the default
    /// prompt).
    pub system_len: u32,
    /// Token just past its system block: the block is dropped only from a piece that holds it
    /// whole.
    pub system_end: u32,
}

/// A contiguous piece of one sample placed in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// The sample.
    pub sample: SampleRef,
    /// Chunk index within the row (instructions of one chunk share it).
    pub chunk: u32,
    /// First token of the sample taken.
    pub offset: u32,
    /// Tokens taken.
    pub len: u32,
}

/// One planned row: a run of pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowPlan {
    /// Index of the first piece in [`PackPlan::pieces`].
    pub start: u32,
    /// Number of pieces.
    pub count: u32,
    /// Tokens in the row, prefix included.
    pub len: u32,
}

/// Counts of over-long samples and what was done with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct OverlongCounts {
    /// Samples cut to fit.
    pub truncated: usize,
    /// Samples cut into several pieces.
    pub split: usize,
    /// Samples left out.
    pub dropped: usize,
}

/// Which rows hold which pieces of which samples.
#[derive(Debug, Clone, PartialEq)]
pub struct PackPlan {
    /// Tokens of the default-prompt prefix at the start of every row (0 outside `moi`).
    pub prefix_len: u32,
    /// The rows.
    pub rows: Vec<RowPlan>,
    /// All pieces, row after row.
    pub pieces: Vec<Piece>,
    /// Over-long samples.
    pub overlong: OverlongCounts,
}

impl PackPlan {
    /// The pieces of row `i`.
    pub fn row_pieces(&self, i: usize) -> &[Piece] {
        let r = self.rows[i];
        &self.pieces[r.start as usize..(r.start + r.count) as usize]
    }

    /// Tokens placed in rows, prefixes included.
    pub fn tokens(&self) -> u64 {
        self.rows.iter().map(|r| u64::from(r.len)).sum()
    }

    /// Share of row slots filled, rows counted at `max_seq_len` each.
    pub fn fill(&self, max_seq_len: usize) -> f64 {
        if self.rows.is_empty() {
            return 0.0;
        }
        self.tokens() as f64 / (self.rows.len() as f64 * max_seq_len as f64)
    }
}

/// Cuts samples that do not fit `capacity` per the over-long rule; returns the pieces of one
/// sample (empty when dropped).
fn fit(
    sample: SampleRef,
    len: u32,
    capacity: u32,
    rule: Overlong,
    counts: &mut OverlongCounts,
    out: &mut Vec<Piece>,
) {
    let piece = |offset, len| Piece {
        sample,
        chunk: 0,
        offset,
        len,
    };
    if len <= capacity {
        out.push(piece(0, len));
        return;
    }
    match rule {
        Overlong::Truncate => {
            counts.truncated += 1;
            out.push(piece(0, capacity));
        }
        Overlong::Split => {
            counts.split += 1;
            let mut offset = 0;
            while offset < len {
                let take = capacity.min(len - offset);
                out.push(piece(offset, take));
                offset += take;
            }
        }
        Overlong::Drop => counts.dropped += 1,
    }
}

/// Rows partners are tried against per row that forms a chunk of one instruction, in large
/// plans.
const MIX_ATTEMPTS: usize = 24;
/// Plans up to this many rows try every row as a partner.
const MIX_EXHAUSTIVE_ROWS: usize = 2048;
/// Passes over the rows, while one still improves.
const MIX_PASSES: usize = 3;

/// A candidate exchange between two rows: the quality after it (mixed chunks, lone
/// instructions), the unit leaving the first row and the unit leaving the second.
type Exchange = ((u32, u32), Option<usize>, Option<usize>);

/// Improves a packing so that more chunks mix tasks without adding a row: for each row with a
/// chunk of one instruction, moves or swaps one of its units with one of another row wherever
/// both still fit and the two rows then form more mixed chunks together (or as many, with fewer
/// lone instructions). Rows emptied by moves are dropped. Returns the new number of bins.
fn mix_rows(
    bin_of: &mut [u32],
    bins: usize,
    lens: &[u32],
    task_of: &[u32],
    capacity: u32,
    k: usize,
    rng: &mut ChaCha8Rng,
) -> usize {
    let tasks = task_of.iter().copied().max().map_or(0, |t| t as usize + 1);
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); bins];
    for (u, &b) in bin_of.iter().enumerate() {
        members[b as usize].push(u as u32);
    }
    let counts_of = |m: &[u32], out: &mut Vec<u32>| {
        out.clear();
        out.resize(tasks, 0);
        for &u in m {
            out[task_of[u as usize] as usize] += 1;
        }
    };
    let mut loads: Vec<u32> = members
        .iter()
        .map(|m| m.iter().map(|&u| lens[u as usize]).sum())
        .collect();
    let mut order: Vec<usize> = (0..bins).collect();
    order.shuffle(rng);
    // Small plans try every other row as a partner; large ones a random sample.
    let exhaustive = bins <= MIX_EXHAUSTIVE_ROWS;
    let mut partners: Vec<usize> = order.clone();
    let (mut c1, mut c2) = (Vec::new(), Vec::new());
    let better = |a: (u32, u32), b: (u32, u32)| a.0 > b.0 || (a.0 == b.0 && a.1 < b.1);
    for _pass in 0..MIX_PASSES {
        let mut improved = false;
        for &r in &order {
            if exhaustive {
                partners.shuffle(rng);
            } else {
                partners.clear();
                partners.extend((0..MIX_ATTEMPTS).map(|_| rng.random_range(0..bins)));
            }
            for &r2 in &partners {
                counts_of(&members[r], &mut c1);
                let q1 = mixed_in(&c1, k);
                if q1.1 == 0 || members[r].is_empty() {
                    break;
                }
                if r2 == r || members[r2].is_empty() {
                    continue;
                }
                counts_of(&members[r2], &mut c2);
                let q2 = mixed_in(&c2, k);
                let before = (q1.0 + q2.0, q1.1 + q2.1);
                // The best move (a out of r, or b out of r2) or swap (a for b).
                let mut best: Option<Exchange> = None;
                let n1 = members[r].len();
                let n2 = members[r2].len();
                for i in 0..=n1 {
                    for j in 0..=n2 {
                        let a = (i < n1).then_some(i);
                        let b = (j < n2).then_some(j);
                        let (ua, ub) = (a.map(|i| members[r][i]), b.map(|j| members[r2][j]));
                        let (ta, tb) = (
                            ua.map(|u| task_of[u as usize] as usize),
                            ub.map(|u| task_of[u as usize] as usize),
                        );
                        if (a.is_none() && b.is_none()) || (ta.is_some() && ta == tb) {
                            continue;
                        }
                        let la = ua.map_or(0, |u| lens[u as usize]);
                        let lb = ub.map_or(0, |u| lens[u as usize]);
                        if loads[r] - la + lb > capacity || loads[r2] - lb + la > capacity {
                            continue;
                        }
                        if let Some(t) = ta {
                            c1[t] -= 1;
                            c2[t] += 1;
                        }
                        if let Some(t) = tb {
                            c2[t] -= 1;
                            c1[t] += 1;
                        }
                        let (x1, x2) = (mixed_in(&c1, k), mixed_in(&c2, k));
                        if let Some(t) = ta {
                            c1[t] += 1;
                            c2[t] -= 1;
                        }
                        if let Some(t) = tb {
                            c2[t] += 1;
                            c1[t] -= 1;
                        }
                        let after = (x1.0 + x2.0, x1.1 + x2.1);
                        if better(after, before) && best.is_none_or(|(q, _, _)| better(after, q)) {
                            best = Some((after, a, b));
                        }
                    }
                }
                if let Some((_, a, b)) = best {
                    let ua = a.map(|i| members[r].swap_remove(i));
                    let ub = b.map(|j| members[r2].swap_remove(j));
                    let (la, lb) = (
                        ua.map_or(0, |u| lens[u as usize]),
                        ub.map_or(0, |u| lens[u as usize]),
                    );
                    members[r].extend(ub);
                    members[r2].extend(ua);
                    loads[r] = loads[r] - la + lb;
                    loads[r2] = loads[r2] - lb + la;
                    improved = true;
                }
            }
        }
        if !improved {
            break;
        }
    }
    // Renumber the rows that still hold something, in their order.
    let mut next = 0u32;
    for m in &members {
        if m.is_empty() {
            continue;
        }
        for &u in m {
            bin_of[u as usize] = next;
        }
        next += 1;
    }
    next as usize
}

/// Packs units row by row, longest first: each row starts with the longest unit left and is
/// filled with the longest unit that fits — from a task the row lacks when one fits, else from
/// one that keeps the row balanced (no task with more units than the others together, but
/// one), else any. Sorted and best-fitting, this fills rows as tightly as best-fit decreasing;
/// the task order keeps them mixed. Returns the bin of each unit and the number of bins.
fn pack_rows_mixed(lens: &[u32], task_of: &[u32], capacity: u32) -> (Vec<u32>, usize) {
    use std::collections::BTreeMap;
    let tasks = task_of.iter().copied().max().map_or(0, |t| t as usize + 1);
    // Per task: length → units of that length (a stack, sampler order kept).
    let mut left: Vec<BTreeMap<u32, Vec<u32>>> = vec![BTreeMap::new(); tasks];
    for (u, (&len, &t)) in lens.iter().zip(task_of).enumerate().rev() {
        left[t as usize].entry(len).or_default().push(u as u32);
    }
    let take = |left: &mut Vec<BTreeMap<u32, Vec<u32>>>, t: usize, len: u32| -> Option<u32> {
        let units = left[t].get_mut(&len)?;
        let u = units.pop();
        if units.is_empty() {
            left[t].remove(&len);
        }
        u
    };
    let longest_fitting = |left: &Vec<BTreeMap<u32, Vec<u32>>>, t: usize, gap: u32| {
        left[t].range(..=gap).next_back().map(|(&len, _)| len)
    };
    let mut order: Vec<u32> = (0..lens.len() as u32).collect();
    order.sort_by(|&a, &b| lens[b as usize].cmp(&lens[a as usize]));
    let mut placed = vec![false; lens.len()];
    let mut bin_of = vec![0u32; lens.len()];
    let mut bins = 0u32;
    let mut counts = vec![0u32; tasks];
    for &first in &order {
        if placed[first as usize] {
            continue;
        }
        let t0 = task_of[first as usize] as usize;
        let u = take(&mut left, t0, lens[first as usize]).unwrap_or(first);
        placed[u as usize] = true;
        bin_of[u as usize] = bins;
        counts.iter_mut().for_each(|c| *c = 0);
        counts[t0] = 1;
        let mut gap = capacity - lens[u as usize].min(capacity);
        loop {
            let total: u32 = counts.iter().sum();
            // After joining, the task holds at most one unit more than the others together.
            let balanced = |t: usize| 2 * (counts[t] + 1) <= total + 2;
            let pick = |allowed: &dyn Fn(usize) -> bool| {
                (0..tasks)
                    .filter(|&t| allowed(t))
                    .filter_map(|t| longest_fitting(&left, t, gap).map(|len| (len, t)))
                    .max()
            };
            let Some((len, t)) = pick(&|t| counts[t] == 0)
                .or_else(|| pick(&balanced))
                .or_else(|| pick(&|_| true))
            else {
                break;
            };
            let Some(u) = take(&mut left, t, len) else {
                break;
            };
            placed[u as usize] = true;
            bin_of[u as usize] = bins;
            counts[t] += 1;
            gap -= len;
        }
        bins += 1;
    }
    (bin_of, bins as usize)
}

/// Rows a plain best-fit-decreasing packing of `lens` into rows of `capacity` needs (tasks
/// ignored): the reference a task-mixing packer is measured against.
pub fn best_fit_decreasing_rows(lens: &[u32], capacity: u32) -> usize {
    let mut sorted: Vec<u32> = lens.iter().map(|&l| l.min(capacity)).collect();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let mut open: BTreeSet<(u32, u32)> = BTreeSet::new();
    let mut rows = 0u32;
    for len in sorted {
        match open.range((len, 0)..).next().copied() {
            Some(key) => {
                open.remove(&key);
                if key.0 > len {
                    open.insert((key.0 - len, key.1));
                }
            }
            None => {
                if capacity > len {
                    open.insert((capacity - len, rows));
                }
                rows += 1;
            }
        }
    }
    rows as usize
}

/// How many chunks a row of these per-task instruction counts forms with chunks of up to `k`:
/// as many as its most frequent task has instructions (one of them in each), more when `k`
/// forces it.
fn chunk_count(counts: &[u32], k: usize) -> u32 {
    let total: u32 = counts.iter().sum();
    let most = counts.iter().copied().max().unwrap_or(0);
    most.max(total.div_ceil(k.max(1) as u32))
}

/// Mixed chunks and chunks of a single instruction that [`form_chunks`] makes of a row with
/// these per-task counts: dealt over the chunks, every chunk of two or more holds distinct
/// tasks, and a chunk is left alone only when one task has more instructions than the others.
fn mixed_in(counts: &[u32], k: usize) -> (u32, u32) {
    let total: u32 = counts.iter().sum();
    let chunks = chunk_count(counts, k);
    let single = (2 * chunks).saturating_sub(total).min(chunks);
    (chunks - single, single)
}

/// Orders a row's pieces into chunks of up to `k` instructions of distinct tasks: the chunk
/// count is the most frequent task's count (or what `k` needs), and tasks, most frequent
/// first, are dealt round the chunks, so no chunk holds one task twice and a chunk of one
/// instruction is left only when one task has more instructions in the row than all the others.
fn form_chunks(pieces: &mut [Piece], k: usize, rng: &mut ChaCha8Rng) {
    let mut by_task: Vec<(u32, Vec<Piece>)> = Vec::new();
    for p in pieces.iter() {
        match by_task.iter_mut().find(|(t, _)| *t == p.sample.task) {
            Some((_, list)) => list.push(*p),
            None => by_task.push((p.sample.task, vec![*p])),
        }
    }
    by_task.shuffle(rng);
    // Stable: ties keep the shuffled task order.
    by_task.sort_by_key(|(_, list)| std::cmp::Reverse(list.len()));
    let counts: Vec<u32> = by_task.iter().map(|(_, l)| l.len() as u32).collect();
    let chunks = chunk_count(&counts, k).max(1) as usize;
    let mut dealt: Vec<Vec<Piece>> = vec![Vec::new(); chunks];
    let mut next = 0;
    for (_, list) in &by_task {
        for p in list {
            dealt[next % chunks].push(*p);
            next += 1;
        }
    }
    let mut out = Vec::with_capacity(pieces.len());
    for (c, mut chunk) in dealt.into_iter().enumerate() {
        chunk.shuffle(rng);
        out.extend(chunk.into_iter().map(|p| Piece {
            chunk: c as u32,
            ..p
        }));
    }
    pieces.copy_from_slice(&out);
}

/// How a plan's chunks mix tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ChunkMix {
    /// Chunks in the rows (the default prompt is none).
    pub chunks: usize,
    /// Chunks holding instructions of two or more distinct tasks (what MoI mixes).
    pub mixed: usize,
    /// Chunks the sizes keep from mixing: a row's only instruction, too long to share its row
    /// with the shortest instruction of any other task.
    pub unmixable: usize,
}

impl ChunkMix {
    /// Share of all chunks that mix tasks.
    pub fn share(&self) -> f64 {
        if self.chunks == 0 {
            0.0
        } else {
            self.mixed as f64 / self.chunks as f64
        }
    }

    /// Share of the chunks the sizes allow to mix that do.
    pub fn share_of_mixable(&self) -> f64 {
        let mixable = self.chunks - self.unmixable;
        if mixable == 0 {
            1.0
        } else {
            self.mixed as f64 / mixable as f64
        }
    }
}

/// Counts a plan's chunks, the mixed ones and the ones sizes keep from mixing; `capacity` is a
/// row's room for instructions (after the default prompt).
pub fn chunk_mix(plan: &PackPlan, capacity: u32) -> ChunkMix {
    let mut shortest: Vec<u32> = Vec::new();
    for p in &plan.pieces {
        let t = p.sample.task as usize;
        if shortest.len() <= t {
            shortest.resize(t + 1, u32::MAX);
        }
        shortest[t] = shortest[t].min(p.len);
    }
    let shortest_other = |task: usize| {
        shortest
            .iter()
            .enumerate()
            .filter(|&(t, _)| t != task)
            .map(|(_, &l)| l)
            .min()
            .unwrap_or(u32::MAX)
    };
    let mut mix = ChunkMix::default();
    for i in 0..plan.rows.len() {
        let pieces = plan.row_pieces(i);
        if let [only] = pieces
            && only
                .len
                .saturating_add(shortest_other(only.sample.task as usize))
                > capacity
        {
            mix.unmixable += 1;
        }
        let mut start = 0;
        while start < pieces.len() {
            let c = pieces[start].chunk;
            let end = start + pieces[start..].iter().take_while(|p| p.chunk == c).count();
            let tasks: BTreeSet<u32> = pieces[start..end].iter().map(|p| p.sample.task).collect();
            mix.chunks += 1;
            mix.mixed += usize::from(tasks.len() >= 2);
            start = end;
        }
    }
    mix
}

/// Plans the rows of one epoch.
///
/// `epoch` is the sampler's shuffled list; `info` gives each sample's length; `prefix_len` is the
/// token count of the default-prompt prefix (used in `moi` mode only); `num_tasks` sets the chunk
/// size when the settings leave it at 0.
pub fn plan(
    epoch: &[SampleRef],
    info: &dyn Fn(SampleRef) -> SampleInfo,
    num_tasks: usize,
    prefix_len: u32,
    settings: &PackSettings,
    seed: u64,
) -> PackPlan {
    let max = settings.max_seq_len.max(1) as u32;
    let moi = settings.mode == PackMode::Moi;
    let prefix_len = if moi { prefix_len.min(max - 1) } else { 0 };
    let capacity = max - prefix_len;
    let mut counts = OverlongCounts::default();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7061_636b);

    // 1. Samples to pieces (over-long ones cut or dropped).
    let mut pieces: Vec<Piece> = Vec::with_capacity(epoch.len());
    for &s in epoch {
        fit(
            s,
            info(s).len,
            capacity,
            settings.overlong,
            &mut counts,
            &mut pieces,
        );
    }

    // 2. Pieces to rows.
    let (bin_of, bins) = if settings.mode == PackMode::Seq {
        ((0..pieces.len() as u32).collect(), pieces.len())
    } else {
        let lens: Vec<u32> = pieces.iter().map(|p| p.len).collect();
        let task_of: Vec<u32> = pieces.iter().map(|p| p.sample.task).collect();
        let (mut bin_of, mut bins) = pack_rows_mixed(&lens, &task_of, capacity);
        if moi {
            let k = if settings.chunk_size == 0 {
                num_tasks.max(1)
            } else {
                settings.chunk_size
            };
            bins = mix_rows(&mut bin_of, bins, &lens, &task_of, capacity, k, &mut rng);
        }
        // Rows in a seeded random order, not longest-first as the packer opened them.
        let mut order: Vec<u32> = (0..bins as u32).collect();
        order.shuffle(&mut rng);
        (
            bin_of
                .iter()
                .map(|&b| order[b as usize])
                .collect::<Vec<u32>>(),
            bins,
        )
    };

    // 3. Lay the rows out, keeping each row's pieces in placement order (a counting sort).
    let mut per_row = vec![0u32; bins + 1];
    for &b in &bin_of {
        per_row[b as usize + 1] += 1;
    }
    for i in 1..per_row.len() {
        per_row[i] += per_row[i - 1];
    }
    let mut rows: Vec<RowPlan> = (0..bins)
        .map(|b| RowPlan {
            start: per_row[b],
            count: per_row[b + 1] - per_row[b],
            len: prefix_len,
        })
        .collect();
    let mut next = per_row[..bins].to_vec();
    let mut placed = pieces.clone();
    for (piece, &b) in pieces.iter().zip(&bin_of) {
        let b = b as usize;
        placed[next[b] as usize] = *piece;
        next[b] += 1;
        rows[b].len += piece.len;
    }
    if moi {
        let k = if settings.chunk_size == 0 {
            num_tasks.max(1)
        } else {
            settings.chunk_size
        };
        for row in &mut rows {
            let slice = &mut placed[row.start as usize..(row.start + row.count) as usize];
            form_chunks(slice, k, &mut rng);
            // The first instruction loses its own system block when answered under the default.
            let first = slice.first().filter(|p| p.offset == 0);
            if let Some(first) = first.filter(|_| settings.first_under_default && prefix_len > 0) {
                // As `build_row` decides it: the piece holds the whole block.
                let sample = info(first.sample);
                if sample.system_end <= first.len {
                    row.len -= sample.system_len;
                }
            }
        }
    } else {
        // Outside moi every instruction is its own chunk.
        for row in &rows {
            let slice = &mut placed[row.start as usize..(row.start + row.count) as usize];
            for (j, p) in slice.iter_mut().enumerate() {
                p.chunk = j as u32;
            }
        }
    }
    PackPlan {
        prefix_len,
        rows,
        pieces: placed,
        overlong: counts,
    }
}

/// Token data of one sample, as the mixing engine tokenized it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SampleTokens {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Label per token: the id where trained, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i32>,
    /// Token range of the sample's system block (markers included); empty when it has none.
    pub system: Range<u32>,
}

/// What a segment of a row holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentKind {
    /// The default system prompt at the head of a `moi` row.
    DefaultPrompt,
    /// One instruction (or a piece of one).
    Instruction,
}

/// A run of tokens in a row from one source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// What it is.
    pub kind: SegmentKind,
    /// The task, for instructions.
    pub task: Option<u32>,
    /// The record within the task's training records, for instructions.
    pub record: Option<u32>,
    /// Chunk index within the row.
    pub chunk: u32,
    /// Token range in the row.
    pub tokens: Range<u32>,
    /// Token range of the system prompt in the row (empty when none).
    pub system: Range<u32>,
    /// First token of the sample this segment starts at (non-zero for the later pieces of a
    /// split sample).
    pub offset: u32,
    /// Whether the segment holds less than the whole sample (truncated or split).
    pub partial: bool,
}

/// A built row, ready for the trainer or the preview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRow {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels ([`IGNORE_INDEX`] where not trained).
    pub labels: Vec<i32>,
    /// Position ids.
    pub position_ids: Vec<u32>,
    /// Attention segment of each token: tokens attend (causally) to earlier tokens of their own
    /// segment and to segment 0, the shared prefix.
    pub segment_ids: Vec<u32>,
    /// The segments, in order.
    pub segments: Vec<Segment>,
}

impl PackedRow {
    /// Whether token `query` may attend to token `key` in this row.
    pub fn may_attend(&self, query: usize, key: usize) -> bool {
        key <= query
            && (self.segment_ids[key] == 0 || self.segment_ids[key] == self.segment_ids[query])
    }
}

/// The token range of a piece that lands in its row and the system block it leaves out (the
/// row's first instruction answered under the default prompt drops its own).
fn piece_tokens(
    plan: &PackPlan,
    n: usize,
    piece: &Piece,
    sample: &SampleTokens,
    settings: &PackSettings,
) -> (Range<usize>, Range<usize>) {
    let from = piece.offset as usize;
    let to = (from + piece.len as usize).min(sample.input_ids.len());
    let mut skip = from..from;
    if n == 0
        && settings.first_under_default
        && settings.mode == PackMode::Moi
        && plan.prefix_len > 0
        && from == 0
        && sample.system.end as usize <= to
    {
        skip = sample.system.start as usize..sample.system.end as usize;
    }
    (from..to, skip)
}

/// Trained tokens of row `i` as [`build_row`] builds it, counted without building it: each
/// piece's labels, less its system block when dropped and less its first token (never
/// predicted from the segment before it).
pub fn trained_in_row<'a>(
    plan: &PackPlan,
    i: usize,
    tokens: &dyn Fn(SampleRef) -> &'a SampleTokens,
    settings: &PackSettings,
) -> u64 {
    let mut trained = 0;
    for (n, piece) in plan.row_pieces(i).iter().enumerate() {
        let sample = tokens(piece.sample);
        let (range, skip) = piece_tokens(plan, n, piece, sample, settings);
        let mut kept = range.filter(|t| !skip.contains(t));
        // The first kept token's label is cleared in the row.
        if kept.next().is_some() {
            trained += kept.filter(|&t| sample.labels[t] >= 0).count() as u64;
        }
    }
    trained
}

/// Builds row `i` of a plan from token data.
pub fn build_row<'a>(
    plan: &PackPlan,
    i: usize,
    tokens: &dyn Fn(SampleRef) -> &'a SampleTokens,
    prefix: &SampleTokens,
    settings: &PackSettings,
) -> PackedRow {
    let len = plan.rows[i].len as usize;
    let mut row = PackedRow {
        input_ids: Vec::with_capacity(len),
        labels: Vec::with_capacity(len),
        position_ids: Vec::with_capacity(len),
        segment_ids: Vec::with_capacity(len),
        segments: Vec::new(),
    };
    let prefix_len = plan.prefix_len as usize;
    if prefix_len > 0 {
        let take = prefix_len.min(prefix.input_ids.len());
        row.input_ids.extend_from_slice(&prefix.input_ids[..take]);
        row.labels.extend(std::iter::repeat_n(IGNORE_INDEX, take));
        row.segments.push(Segment {
            kind: SegmentKind::DefaultPrompt,
            task: None,
            record: None,
            chunk: 0,
            tokens: 0..take as u32,
            system: 0..take as u32,
            offset: 0,
            partial: take < prefix.input_ids.len(),
        });
    }
    let prefix_end = row.input_ids.len();
    for (n, piece) in plan.row_pieces(i).iter().enumerate() {
        let sample = tokens(piece.sample);
        // The row's first instruction may be answered under the default prompt alone.
        let (range, skip) = piece_tokens(plan, n, piece, sample, settings);
        let (from, to) = (range.start, range.end);
        let start = row.input_ids.len() as u32;
        let mut system = start..start;
        for t in from..to {
            if skip.contains(&t) {
                continue;
            }
            if (sample.system.start as usize..sample.system.end as usize).contains(&t) {
                if system.is_empty() {
                    system = row.input_ids.len() as u32..row.input_ids.len() as u32;
                }
                system.end = row.input_ids.len() as u32 + 1;
            }
            row.input_ids.push(sample.input_ids[t]);
            row.labels.push(sample.labels[t]);
        }
        // A segment's first token is never predicted from the segment before it.
        if let Some(first) = row.labels.get_mut(start as usize) {
            *first = IGNORE_INDEX;
        }
        row.segments.push(Segment {
            kind: SegmentKind::Instruction,
            task: Some(piece.sample.task),
            record: Some(piece.sample.record),
            chunk: piece.chunk,
            tokens: start..row.input_ids.len() as u32,
            system,
            offset: piece.offset,
            partial: piece.offset > 0 || (to - from) < sample.input_ids.len(),
        });
    }
    // Segment ids and positions from the layout.
    for seg in &row.segments {
        let id = match (seg.kind, settings.attention) {
            (SegmentKind::DefaultPrompt, _) | (_, AttentionLayout::Full) => 0,
            (SegmentKind::Instruction, AttentionLayout::Chunk) => seg.chunk + 1,
            (SegmentKind::Instruction, AttentionLayout::Isolated) => 0,
        };
        for _ in seg.tokens.clone() {
            row.segment_ids.push(id);
        }
    }
    if settings.attention == AttentionLayout::Isolated {
        let mut next_id = 1;
        for seg in &row.segments {
            if seg.kind == SegmentKind::Instruction {
                for t in seg.tokens.clone() {
                    row.segment_ids[t as usize] = next_id;
                }
                next_id += 1;
            }
        }
    }
    let mut pos = 0u32;
    let mut last_chunk: Option<u32> = None;
    for seg in &row.segments {
        if settings.reset_position_ids && seg.kind == SegmentKind::Instruction {
            // Chunk layout restarts per chunk; the others per instruction.
            let new_chunk = last_chunk != Some(seg.chunk);
            if settings.attention != AttentionLayout::Chunk || new_chunk {
                pos = prefix_end as u32;
            }
            last_chunk = Some(seg.chunk);
        }
        for _ in seg.tokens.clone() {
            row.position_ids.push(pos);
            pos += 1;
        }
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::sampling::{Strategy, TaskSize, sample_epoch};

    fn lengths(task: u32, record: u32) -> u32 {
        // Three tasks: short, medium and long answers.
        let spread = (record.wrapping_mul(2_654_435_761) >> 7) % 1000;
        match task {
            0 => 50 + spread / 5,
            1 => 150 + spread / 2,
            _ => 400 + spread * 8 / 10,
        }
    }

    fn info(s: SampleRef) -> SampleInfo {
        SampleInfo {
            len: lengths(s.task, s.record),
            trained: lengths(s.task, s.record) / 2,
            system_len: 10,
            system_end: 10,
        }
    }

    fn epoch(sizes: &[usize], strategy: Strategy) -> Vec<SampleRef> {
        let tasks: Vec<TaskSize> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| TaskSize {
                name: format!("t{i}"),
                records: n,
                weight: 1.0,
            })
            .collect();
        sample_epoch(&tasks, strategy, 3, 0)
    }

    fn settings(mode: PackMode) -> PackSettings {
        PackSettings {
            mode,
            ..PackSettings::default()
        }
    }

    #[test]
    fn no_row_exceeds_the_limit_and_no_token_is_lost() {
        let e = epoch(&[3000, 2000, 1000], Strategy::Balanced);
        for mode in PackMode::ALL {
            let s = settings(mode);
            let plan = plan(&e, &info, 3, 12, &s, 1);
            assert!(
                plan.rows.iter().all(|r| r.len as usize <= s.max_seq_len),
                "{mode:?}"
            );
            // Every sample appears exactly once, whole (none is over-long here).
            let mut seen: Vec<(u32, u32, u32)> = plan
                .pieces
                .iter()
                .map(|p| (p.sample.task, p.sample.record, p.offset))
                .collect();
            let mut want: Vec<(u32, u32, u32)> = e.iter().map(|s| (s.task, s.record, 0)).collect();
            seen.sort_unstable();
            want.sort_unstable();
            assert_eq!(seen, want, "{mode:?}");
            let tokens: u64 = e.iter().map(|s| u64::from(info(*s).len)).sum();
            let prefixes = u64::from(plan.prefix_len) * plan.rows.len() as u64;
            assert_eq!(plan.tokens(), tokens + prefixes, "{mode:?}");
        }
    }

    #[test]
    fn packed_modes_fill_rows() {
        let e = epoch(&[30_000, 20_000, 10_000], Strategy::Balanced);
        for mode in [PackMode::Concat, PackMode::Balanced, PackMode::Moi] {
            let p = plan(&e, &info, 3, 12, &settings(mode), 1);
            let fill = p.fill(2048);
            assert!(fill >= 0.997, "{mode:?} fill {fill}");
        }
        let seq = plan(&e, &info, 3, 12, &settings(PackMode::Seq), 1);
        assert_eq!(seq.rows.len(), e.len());
    }

    #[test]
    fn moi_rows_are_task_mixed_chunks() {
        let e = epoch(&[3000, 3000, 3000], Strategy::Balanced);
        let p = plan(&e, &info, 3, 12, &settings(PackMode::Moi), 1);
        let mut rows_with_all = 0;
        let mut rows_with_two = 0;
        for i in 0..p.rows.len() {
            let pieces = p.row_pieces(i);
            let tasks: BTreeSet<u32> = pieces.iter().map(|x| x.sample.task).collect();
            if tasks.len() == 3 {
                rows_with_all += 1;
            }
            if tasks.len() >= 2 {
                rows_with_two += 1;
            }
            // A chunk never holds two instructions of one task, nor more than K.
            let max_chunk = pieces.iter().map(|x| x.chunk).max().unwrap_or(0);
            for c in 0..=max_chunk {
                let in_chunk: Vec<u32> = pieces
                    .iter()
                    .filter(|x| x.chunk == c)
                    .map(|x| x.sample.task)
                    .collect();
                let distinct: BTreeSet<u32> = in_chunk.iter().copied().collect();
                assert_eq!(distinct.len(), in_chunk.len());
                assert!(in_chunk.len() <= 3);
            }
            // Chunks are contiguous and in order.
            assert!(pieces.windows(2).all(|w| w[0].chunk <= w[1].chunk));
        }
        // Rows average 4.5 instructions of very different lengths: most hold every task, and
        // nearly all hold more than one.
        let n = p.rows.len();
        assert!(
            rows_with_all * 2 >= n,
            "{rows_with_all} of {n} rows hold all three tasks"
        );
        assert!(
            rows_with_two * 10 >= n * 9,
            "{rows_with_two} of {n} rows hold two tasks or more"
        );
    }

    #[test]
    fn overlong_samples_are_truncated_split_or_dropped() {
        let e: Vec<SampleRef> = (0..4).map(|r| SampleRef { task: 0, record: r }).collect();
        let long = |s: SampleRef| SampleInfo {
            len: if s.record == 0 { 5000 } else { 100 },
            trained: 10,
            system_len: 0,
            system_end: 0,
        };
        for (rule, pieces, counts) in [
            (Overlong::Truncate, 4, (1, 0, 0)),
            (Overlong::Split, 6, (0, 1, 0)),
            (Overlong::Drop, 3, (0, 0, 1)),
        ] {
            let s = PackSettings {
                mode: PackMode::Concat,
                overlong: rule,
                ..PackSettings::default()
            };
            let p = plan(&e, &long, 1, 0, &s, 0);
            assert_eq!(p.pieces.len(), pieces, "{rule:?}");
            let o = p.overlong;
            assert_eq!((o.truncated, o.split, o.dropped), counts, "{rule:?}");
            assert!(p.rows.iter().all(|r| r.len <= 2048));
        }
    }

    #[test]
    fn same_seed_same_rows() {
        let e = epoch(&[500, 300, 200], Strategy::Balanced);
        let a = plan(&e, &info, 3, 12, &settings(PackMode::Moi), 9);
        assert_eq!(a, plan(&e, &info, 3, 12, &settings(PackMode::Moi), 9));
    }

    fn toy_tokens(task: u32, record: u32) -> SampleTokens {
        // [system 3 tokens][user 2 tokens][assistant 2 tokens]
        let base = task * 1000 + record * 10;
        SampleTokens {
            input_ids: (0..7).map(|i| base + i).collect(),
            labels: (0..7)
                .map(|i| {
                    if i >= 5 {
                        (base + i) as i32
                    } else {
                        IGNORE_INDEX
                    }
                })
                .collect(),
            system: 0..3,
        }
    }

    /// Toy samples of three tasks (`per_task` each), a balanced epoch of them and a two-token
    /// default-prompt prefix.
    fn toy_epoch(per_task: u32) -> (Vec<Vec<SampleTokens>>, Vec<SampleRef>, SampleTokens) {
        let store = (0..3)
            .map(|t| (0..per_task).map(|r| toy_tokens(t, r)).collect())
            .collect();
        let n = per_task as usize;
        let prefix = SampleTokens {
            input_ids: vec![9001, 9002],
            labels: vec![IGNORE_INDEX; 2],
            system: 0..2,
        };
        (store, epoch(&[n, n, n], Strategy::Balanced), prefix)
    }

    fn toy_info(_s: SampleRef) -> SampleInfo {
        SampleInfo {
            len: 7,
            trained: 2,
            system_len: 3,
            system_end: 3,
        }
    }

    #[test]
    fn built_rows_start_with_the_default_prompt_and_carry_labels_and_layouts() {
        let (store, e, prefix) = toy_epoch(4);
        let info = toy_info;
        for attention in [
            AttentionLayout::Full,
            AttentionLayout::Isolated,
            AttentionLayout::Chunk,
        ] {
            let s = PackSettings {
                max_seq_len: 30,
                attention,
                reset_position_ids: true,
                ..PackSettings::default()
            };
            let p = plan(&e, &info, 3, 2, &s, 5);
            let get = |r: SampleRef| &store[r.task as usize][r.record as usize];
            for i in 0..p.rows.len() {
                let row = build_row(&p, i, &get, &prefix, &s);
                assert_eq!(
                    &row.input_ids[..2],
                    &[9001, 9002],
                    "every moi row starts with the default prompt"
                );
                assert_eq!(row.input_ids.len(), p.rows[i].len as usize);
                // Labels only on assistant tokens: those whose offset within their sample is ≥ 5.
                for seg in row
                    .segments
                    .iter()
                    .filter(|s| s.kind == SegmentKind::Instruction)
                {
                    let ids = &row.input_ids[seg.tokens.start as usize..seg.tokens.end as usize];
                    let labels = &row.labels[seg.tokens.start as usize..seg.tokens.end as usize];
                    for (k, (&id, &label)) in ids.iter().zip(labels).enumerate() {
                        assert_eq!(label >= 0, k >= 5);
                        if label >= 0 {
                            assert_eq!(label as u32, id);
                        }
                    }
                    assert_eq!(seg.system.end - seg.system.start, 3);
                }
                // Positions restart after the prefix: per instruction, or per chunk.
                let mut last_chunk = None;
                for seg in row
                    .segments
                    .iter()
                    .filter(|s| s.kind == SegmentKind::Instruction)
                {
                    let first_of_chunk = last_chunk != Some(seg.chunk);
                    let restarts = attention != AttentionLayout::Chunk || first_of_chunk;
                    assert_eq!(
                        row.position_ids[seg.tokens.start as usize] == 2,
                        restarts,
                        "{attention:?}"
                    );
                    last_chunk = Some(seg.chunk);
                }
                let segs: Vec<&Segment> = row
                    .segments
                    .iter()
                    .filter(|s| s.kind == SegmentKind::Instruction)
                    .collect();
                if segs.len() >= 2 {
                    let a = segs[0].tokens.start as usize;
                    let b = segs[1].tokens.start as usize + 1;
                    let cross = row.may_attend(b, a);
                    match attention {
                        AttentionLayout::Full => assert!(cross),
                        AttentionLayout::Isolated => assert!(!cross),
                        AttentionLayout::Chunk => assert_eq!(cross, segs[0].chunk == segs[1].chunk),
                    }
                    assert!(row.may_attend(b, 0), "the prefix is visible to everyone");
                }
            }
        }
    }

    #[test]
    fn no_segment_learns_its_first_token_from_the_segment_before() {
        // Every token labelled (as with train_on_prompt), and one sample split in two.
        let full = |n: u32, base: u32| SampleTokens {
            input_ids: (0..n).map(|i| base + i).collect(),
            labels: (0..n).map(|i| (base + i) as i32).collect(),
            system: 0..0,
        };
        let store = [full(40, 100), full(10, 500)];
        let e: Vec<SampleRef> = (0..2).map(|r| SampleRef { task: 0, record: r }).collect();
        let info = |s: SampleRef| SampleInfo {
            len: store[s.record as usize].input_ids.len() as u32,
            trained: 0,
            system_len: 0,
            system_end: 0,
        };
        let s = PackSettings {
            mode: PackMode::Concat,
            max_seq_len: 32,
            overlong: Overlong::Split,
            ..PackSettings::default()
        };
        let p = plan(&e, &info, 1, 0, &s, 0);
        let mut segments = 0;
        for i in 0..p.rows.len() {
            let row = build_row(
                &p,
                i,
                &|r| &store[r.record as usize],
                &SampleTokens::default(),
                &s,
            );
            for seg in &row.segments {
                assert_eq!(row.labels[seg.tokens.start as usize], IGNORE_INDEX);
                assert!(row.labels[seg.tokens.start as usize + 1] >= 0);
                assert_eq!(
                    seg.partial,
                    seg.record == Some(0),
                    "only the split sample is partial"
                );
                segments += 1;
            }
        }
        assert_eq!(segments, 3, "40 tokens split in two, plus the short sample");
    }

    #[test]
    fn trained_tokens_are_counted_as_rows_are_built() {
        // Samples with a system block and answers; some rows answer their first instruction
        // under the default prompt.
        let (store, e, prefix) = toy_epoch(40);
        let info = toy_info;
        for first_under_default in [false, true] {
            let s = PackSettings {
                first_under_default,
                max_seq_len: 32,
                ..PackSettings::default()
            };
            let p = plan(&e, &info, 3, 2, &s, 4);
            let tokens = |r: SampleRef| &store[r.task as usize][r.record as usize];
            for i in 0..p.rows.len() {
                let row = build_row(&p, i, &tokens, &prefix, &s);
                let built = row.labels.iter().filter(|&&l| l >= 0).count() as u64;
                assert_eq!(
                    row.input_ids.len(),
                    p.rows[i].len as usize,
                    "row {i}'s length"
                );
                assert_eq!(trained_in_row(&p, i, &tokens, &s), built, "row {i}");
            }
        }
    }

    #[test]
    fn rows_fill_like_best_fit_decreasing_and_chunks_mix_tasks() {
        let e = epoch(&[3000, 3000, 3000], Strategy::Balanced);
        let s = settings(PackMode::Moi);
        let p = plan(&e, &info, 3, 12, &s, 1);
        let lens: Vec<u32> = p.pieces.iter().map(|x| x.len).collect();
        let reference = best_fit_decreasing_rows(&lens, 2048 - 12);
        assert!(
            p.rows.len() as f64 <= reference as f64 * 1.01,
            "{} rows, best-fit decreasing {reference}",
            p.rows.len()
        );
        let mix = chunk_mix(&p, 2048 - 12);
        assert!(mix.share_of_mixable() >= 0.9, "{mix:?}");
        // Rows come in a shuffled order, not in the order the packer opened them (each row
        // starting with the longest piece left, so their longest pieces would never grow).
        let longest: Vec<u32> = (0..p.rows.len())
            .map(|i| p.row_pieces(i).iter().map(|x| x.len).max().unwrap_or(0))
            .collect();
        assert!(longest.windows(2).any(|w| w[0] < w[1]));
    }

    #[test]
    fn first_instruction_can_drop_its_own_prompt() {
        let store: Vec<SampleTokens> = (0..2).map(|r| toy_tokens(0, r)).collect();
        let e: Vec<SampleRef> = (0..2).map(|r| SampleRef { task: 0, record: r }).collect();
        let info = |_s: SampleRef| SampleInfo {
            len: 7,
            trained: 2,
            system_len: 3,
            system_end: 3,
        };
        let prefix = SampleTokens {
            input_ids: vec![9001],
            labels: vec![IGNORE_INDEX],
            system: 0..1,
        };
        let s = PackSettings {
            first_under_default: true,
            max_seq_len: 64,
            ..PackSettings::default()
        };
        let p = plan(&e, &info, 1, 1, &s, 0);
        let row = build_row(&p, 0, &|r| &store[r.record as usize], &prefix, &s);
        assert_eq!(
            row.segments[1].system,
            1..1,
            "first instruction keeps no system block"
        );
        assert_eq!(row.segments[2].system.end - row.segments[2].system.start, 3);
        assert_eq!(row.input_ids.len(), 1 + 4 + 7);
        assert_eq!(
            p.rows[0].len as usize,
            row.input_ids.len(),
            "the plan counts the dropped block"
        );
    }
}
