//! Packing instructions into training rows, in the four variants of the MoI paper:
//! `seq` (one conversation a row), `concat` (natural mixture, packed), `balanced` (balanced
//! sampling, packed) and `moi` (balanced chunks of one instruction per task, the default system
//! prompt first in every row).
//!
//! Packing is planned on lengths alone (fast enough for millions of samples), then rows are built
//! from token ids only when someone needs them: the trainer a batch at a time, the preview a few.

use std::collections::BTreeSet;
use std::ops::Range;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::core::sampling::{SampleRef, Strategy};

/// Label value for tokens that are not trained.
pub const IGNORE_INDEX: i32 = -100;

/// The paper's packing variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackMode {
    /// One conversation per row.
    Seq,
    /// Samples in natural proportions, packed.
    Concat,
    /// Balanced sampling, then packing.
    Balanced,
    /// Balanced chunks of one instruction per task, the default system prompt first in each row.
    #[default]
    Moi,
}

impl PackMode {
    /// Every mode, in the paper's order.
    pub const ALL: [PackMode; 4] = [
        PackMode::Seq,
        PackMode::Concat,
        PackMode::Balanced,
        PackMode::Moi,
    ];

    /// The sampling strategy this mode implies, given the user's choice for the balanced modes.
    pub fn strategy(self, chosen: Strategy) -> Strategy {
        match self {
            PackMode::Seq | PackMode::Concat => Strategy::Natural,
            PackMode::Balanced | PackMode::Moi => chosen,
        }
    }

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            PackMode::Seq => "seq",
            PackMode::Concat => "concat",
            PackMode::Balanced => "balanced",
            PackMode::Moi => "moi",
        }
    }
}

impl std::str::FromStr for PackMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PackMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                format!("unknown packing mode '{s}': expected seq, concat, balanced or moi")
            })
    }
}

/// Who may attend to whom inside a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionLayout {
    /// Causal across the whole row.
    Full,
    /// Each instruction sees only itself (and the row's default-prompt prefix).
    Isolated,
    /// Each chunk of instructions sees only itself (and the prefix).
    #[default]
    Chunk,
}

/// What to do with a sample longer than a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    /// Keep its first tokens.
    #[default]
    Truncate,
    /// Cut it into row-sized pieces.
    Split,
    /// Leave it out.
    Drop,
}

/// Packing settings, saved in the project's `[packing]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PackSettings {
    /// The variant.
    pub mode: PackMode,
    /// Longest row in tokens.
    pub max_seq_len: usize,
    /// Instructions per chunk in `moi` mode; 0 means one per task.
    pub chunk_size: usize,
    /// In `moi` mode, answer each row's first instruction under the default prompt instead of
    /// its own task prompt.
    pub first_under_default: bool,
    /// Attention layout carried to the trainer as segment ids.
    pub attention: AttentionLayout,
    /// Restart position ids at each segment (after the shared prefix).
    pub reset_position_ids: bool,
    /// Over-long samples.
    pub overlong: Overlong,
    /// How many units the packer sorts (longest first) at a time before placing them; 1 places
    /// them in the sampler's shuffled order, which mixes tasks best.
    pub window: usize,
}

impl Default for PackSettings {
    fn default() -> Self {
        Self {
            mode: PackMode::Moi,
            max_seq_len: 2048,
            chunk_size: 0,
            first_under_default: false,
            attention: AttentionLayout::Full,
            reset_position_ids: false,
            overlong: Overlong::Truncate,
            window: 1,
        }
    }
}

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

/// How many fitting bins the packer looks at when preferring a bin that lacks the item's task.
const MIX_CANDIDATES: usize = 16;
/// How much more room (in tokens) than the best fit a task-mixing choice may leave.
const MIX_SLACK: u32 = 128;

/// Share of pieces (the shortest) held back from the first pass to fill the gaps it leaves.
const HOLD_BACK: f64 = 0.25;

/// Open bins keyed by (remaining capacity, bin id), with the set of tasks each bin holds.
struct Bins {
    open: BTreeSet<(u32, u32)>,
    tasks_in: Vec<u64>,
    capacity: u32,
}

impl Bins {
    /// Puts a unit of `len` tokens from `task` into the best-fitting open bin that is left either
    /// full or with at least `min_gap` tokens free (a smaller gap could never be used), preferring,
    /// among bins nearly as tight, one without that task. Opens a bin when none qualifies.
    fn place(&mut self, len: u32, task: u32, min_gap: u32) -> u32 {
        let bit = 1u64 << (task % 64);
        let exact = self.open.range((len, 0)..(len + 1, 0)).next().copied();
        let tasks_in = &self.tasks_in;
        let chosen = exact.or_else(|| {
            let mut candidates = self
                .open
                .range((len + min_gap.max(1), 0)..)
                .take(MIX_CANDIDATES);
            let best = candidates.next().copied()?;
            if tasks_in[best.1 as usize] & bit == 0 {
                return Some(best);
            }
            Some(
                candidates
                    .take_while(|c| c.0 <= best.0 + MIX_SLACK)
                    .find(|c| tasks_in[c.1 as usize] & bit == 0)
                    .copied()
                    .unwrap_or(best),
            )
        });
        let (remaining, bin) = match chosen {
            Some(key) => {
                self.open.remove(&key);
                (key.0 - len, key.1)
            }
            None => {
                self.tasks_in.push(0);
                (self.capacity - len, self.tasks_in.len() as u32 - 1)
            }
        };
        self.tasks_in[bin as usize] |= bit;
        if remaining > 0 {
            self.open.insert((remaining, bin));
        }
        bin
    }
}

/// Packs pieces of the given lengths into bins of `capacity`. The first pass takes them in the
/// sampler's shuffled order (sorted only inside windows of `window`), so rows mix tasks; the
/// shortest quarter is held back and placed last, longest first, into the gaps the first
/// pass left (best-fit decreasing), which is what brings the fill close to full. Returns the bin
/// of each unit and the number of bins.
fn pack_units(lens: &[u32], task_of: &[u32], capacity: u32, window: usize) -> (Vec<u32>, usize) {
    let n = lens.len();
    let mut bin_of = vec![0u32; n];
    let mut bins = Bins {
        open: BTreeSet::new(),
        tasks_in: Vec::new(),
        capacity,
    };
    // The length up to which pieces are held back.
    let cut = ((n as f64) * HOLD_BACK) as usize;
    let threshold = if cut == 0 {
        0
    } else {
        *lens.to_vec().select_nth_unstable(cut).1
    };
    let (first, held): (Vec<u32>, Vec<u32>) =
        (0..n as u32).partition(|&u| lens[u as usize] > threshold);
    let min_gap = lens.iter().copied().min().unwrap_or(0);
    let window = window.max(1);
    let mut order: Vec<u32> = Vec::with_capacity(window);
    for chunk in first.chunks(window) {
        order.clear();
        order.extend_from_slice(chunk);
        if window > 1 {
            order.sort_by(|&a, &b| lens[b as usize].cmp(&lens[a as usize]));
        }
        for &u in &order {
            bin_of[u as usize] = bins.place(lens[u as usize], task_of[u as usize], min_gap);
        }
    }
    let mut held = held;
    held.sort_by(|&a, &b| lens[b as usize].cmp(&lens[a as usize]));
    for u in held {
        bin_of[u as usize] = bins.place(lens[u as usize], task_of[u as usize], 0);
    }
    let count = bins.tasks_in.len();
    (bin_of, count)
}

/// Orders a row's pieces into chunks of up to `k` instructions, each from a different task
/// where the row allows: chunk `c` takes the `c`-th instruction of every task present, in a
/// shuffled task order.
fn form_chunks(pieces: &mut [Piece], k: usize, rng: &mut ChaCha8Rng) {
    let mut by_task: Vec<(u32, Vec<Piece>)> = Vec::new();
    for p in pieces.iter() {
        match by_task.iter_mut().find(|(t, _)| *t == p.sample.task) {
            Some((_, list)) => list.push(*p),
            None => by_task.push((p.sample.task, vec![*p])),
        }
    }
    by_task.shuffle(rng);
    let mut out = Vec::with_capacity(pieces.len());
    let mut chunk = 0u32;
    let mut round = 0;
    while out.len() < pieces.len() {
        let mut in_chunk = 0;
        for (_, list) in &by_task {
            if let Some(p) = list.get(round) {
                if in_chunk == k.max(1) {
                    chunk += 1;
                    in_chunk = 0;
                }
                out.push(Piece { chunk, ..*p });
                in_chunk += 1;
            }
        }
        chunk += 1;
        round += 1;
    }
    pieces.copy_from_slice(&out);
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
        pack_units(&lens, &task_of, capacity, settings.window)
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
                let system = info(first.sample).system_len;
                if system <= first.len {
                    row.len -= system;
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
        let from = piece.offset as usize;
        let to = (from + piece.len as usize).min(sample.input_ids.len());
        let mut skip = from..from;
        // The row's first instruction may be answered under the default prompt alone.
        if n == 0
            && settings.first_under_default
            && settings.mode == PackMode::Moi
            && prefix_len > 0
            && from == 0
            && sample.system.end as usize <= to
        {
            skip = sample.system.start as usize..sample.system.end as usize;
        }
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
    use crate::core::sampling::{TaskSize, sample_epoch};

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

    #[test]
    fn built_rows_start_with_the_default_prompt_and_carry_labels_and_layouts() {
        let store: Vec<Vec<SampleTokens>> = (0..3)
            .map(|t| (0..4).map(|r| toy_tokens(t, r)).collect())
            .collect();
        let e = epoch(&[4, 4, 4], Strategy::Balanced);
        let info = |_s: SampleRef| SampleInfo {
            len: 7,
            trained: 2,
            system_len: 3,
        };
        let prefix = SampleTokens {
            input_ids: vec![9001, 9002],
            labels: vec![IGNORE_INDEX; 2],
            system: 0..2,
        };
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
    fn first_instruction_can_drop_its_own_prompt() {
        let store: Vec<SampleTokens> = (0..2).map(|r| toy_tokens(0, r)).collect();
        let e: Vec<SampleRef> = (0..2).map(|r| SampleRef { task: 0, record: r }).collect();
        let info = |_s: SampleRef| SampleInfo {
            len: 7,
            trained: 2,
            system_len: 3,
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
