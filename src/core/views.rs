//! View structs the studio draws from: a packed row as token chips, the row's attention layout
//! between segments. Plain data built here so the pack browser only paints.

use tokenizers::Tokenizer;

use crate::core::packing::{IGNORE_INDEX, PackedRow, SegmentKind};

/// One token of a packed row, as the pack browser shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenChip {
    /// Token id.
    pub id: u32,
    /// The token's text, white space made visible (`·` for a space, `↵` for a new line).
    pub text: String,
    /// Position id.
    pub position: u32,
    /// Label (the id, or [`IGNORE_INDEX`]).
    pub label: i32,
    /// Attention segment id (0 = the shared prefix).
    pub segment_id: u32,
    /// Index of the segment in [`PackedRow::segments`].
    pub segment: usize,
    /// The task, for instruction tokens.
    pub task: Option<u32>,
    /// Whether the token is trained.
    pub trained: bool,
    /// Whether the token belongs to a system prompt (a task's or the default one).
    pub system: bool,
    /// Whether it is the first token of its segment.
    pub starts_segment: bool,
    /// Whether it is the first token of a new chunk.
    pub starts_chunk: bool,
}

fn visible(text: &str) -> String {
    text.replace(' ', "·").replace('\n', "↵").replace('\t', "→")
}

/// The chips of a row, one per token.
pub fn token_chips(row: &PackedRow, tokenizer: &Tokenizer) -> Vec<TokenChip> {
    let mut chips = Vec::with_capacity(row.input_ids.len());
    let mut last_chunk = None;
    for (s, seg) in row.segments.iter().enumerate() {
        let new_chunk = seg.kind == SegmentKind::Instruction && last_chunk != Some(seg.chunk);
        if seg.kind == SegmentKind::Instruction {
            last_chunk = Some(seg.chunk);
        }
        for i in seg.tokens.start as usize..(seg.tokens.end as usize).min(row.input_ids.len()) {
            let id = row.input_ids[i];
            let text = tokenizer
                .decode(&[id], false)
                .ok()
                .filter(|t| !t.is_empty() && !t.contains('\u{fffd}'))
                .or_else(|| tokenizer.id_to_token(id))
                .unwrap_or_else(|| format!("#{id}"));
            let first = i == seg.tokens.start as usize;
            chips.push(TokenChip {
                id,
                text: visible(&text),
                position: row.position_ids[i],
                label: row.labels[i],
                segment_id: row.segment_ids[i],
                segment: s,
                task: seg.task,
                trained: row.labels[i] != IGNORE_INDEX,
                system: seg.kind == SegmentKind::DefaultPrompt || seg.system.contains(&(i as u32)),
                starts_segment: first,
                starts_chunk: first && new_chunk,
            });
        }
    }
    chips
}

/// Who may attend to whom, segment by segment: `matrix[q][k]` is true when tokens of segment `q`
/// may attend to tokens of segment `k` (causally, within the row's layout).
pub fn segment_attention(row: &PackedRow) -> Vec<Vec<bool>> {
    let n = row.segments.len();
    let mut matrix = vec![vec![false; n]; n];
    for (q, qs) in row.segments.iter().enumerate() {
        if qs.tokens.is_empty() {
            continue;
        }
        let query = qs.tokens.end as usize - 1;
        for (k, ks) in row.segments.iter().enumerate() {
            if !ks.tokens.is_empty() {
                matrix[q][k] = row.may_attend(query, ks.tokens.start as usize);
            }
        }
    }
    matrix
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::packing::Segment;

    fn row(segment_ids: Vec<u32>) -> PackedRow {
        let seg = |kind, task, chunk, a: u32, b: u32, system: std::ops::Range<u32>| Segment {
            kind,
            task,
            record: task.map(|_| 0),
            chunk,
            tokens: a..b,
            system,
            offset: 0,
            partial: false,
        };
        PackedRow {
            input_ids: vec![0, 1, 2, 3, 4, 5, 6, 7],
            labels: vec![
                IGNORE_INDEX,
                IGNORE_INDEX,
                IGNORE_INDEX,
                3,
                IGNORE_INDEX,
                IGNORE_INDEX,
                6,
                7,
            ],
            position_ids: (0..8).collect(),
            segment_ids,
            segments: vec![
                seg(SegmentKind::DefaultPrompt, None, 0, 0, 2, 0..0),
                seg(SegmentKind::Instruction, Some(0), 0, 2, 4, 2..3),
                seg(SegmentKind::Instruction, Some(1), 1, 4, 8, 4..5),
            ],
        }
    }

    #[test]
    fn chips_carry_task_label_system_and_boundaries() {
        let tokenizer =
            crate::core::bpe::train_bpe(["a b c d e f g h"].iter().map(|s| s.to_string()), 300)
                .unwrap();
        let r = row(vec![0, 0, 1, 1, 2, 2, 2, 2]);
        let chips = token_chips(&r, &tokenizer);
        assert_eq!(chips.len(), 8);
        assert!(chips[0].system && chips[0].task.is_none() && chips[0].starts_segment);
        assert!(chips[2].system && chips[2].starts_chunk && chips[2].task == Some(0));
        assert!(!chips[3].system && chips[3].trained && chips[3].label == 3);
        assert!(chips[4].starts_chunk && chips[4].segment == 2);
        assert!(!chips[5].starts_segment && !chips[5].trained);
        assert!(chips.iter().all(|c| !c.text.is_empty()));
    }

    #[test]
    fn the_attention_matrix_follows_the_layout() {
        // Isolated segments: each sees the prefix and itself.
        let isolated = segment_attention(&row(vec![0, 0, 1, 1, 2, 2, 2, 2]));
        assert_eq!(
            isolated,
            vec![
                vec![true, false, false],
                vec![true, true, false],
                vec![true, false, true]
            ]
        );
        // Full attention: one segment, everything earlier is visible.
        let full = segment_attention(&row(vec![1; 8]));
        assert_eq!(
            full,
            vec![
                vec![true, false, false],
                vec![true, true, false],
                vec![true, true, true]
            ]
        );
    }
}
