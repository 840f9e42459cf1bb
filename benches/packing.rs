//! Packing speed and fill: 1,000,000 samples from a three-task length mix (short, medium, long)
//! into 2048-token rows, in every packing mode.
//!
//!   cargo bench --bench packing -- [SAMPLES (default 1000000)]

use std::collections::BTreeSet;
use std::time::Instant;

use moi_studio::core::packing::{
    PackMode, PackSettings, SampleInfo, best_fit_decreasing_rows, chunk_mix, plan,
};
use moi_studio::core::sampling::{SampleRef, Strategy, TaskSize, sample_epoch};

/// Deterministic pseudo-random lengths: short 50–250, medium 150–650, long 400–1,200 tokens.
fn length(s: SampleRef) -> u32 {
    let spread = (s.record.wrapping_mul(2_654_435_761) >> 7) % 1000;
    match s.task {
        0 => 50 + spread / 5,
        1 => 150 + spread / 2,
        _ => 400 + spread * 8 / 10,
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let samples: usize = args
        .first()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let tasks: Vec<TaskSize> = (0..3)
        .map(|i| TaskSize {
            name: ["short", "medium", "long"][i].to_string(),
            records: samples / 3 + usize::from(i < samples % 3),
            weight: 1.0,
        })
        .collect();
    let info = |s: SampleRef| SampleInfo {
        len: length(s),
        trained: length(s) / 2,
        system_len: 10,
        system_end: 10,
    };
    let start = Instant::now();
    let epoch = sample_epoch(&tasks, Strategy::Balanced, 42, 0);
    println!(
        "balanced sampling of {} samples: {:.3} s",
        epoch.len(),
        start.elapsed().as_secs_f64()
    );
    for mode in PackMode::ALL {
        let settings = PackSettings {
            mode,
            max_seq_len: 2048,
            ..PackSettings::default()
        };
        // Warm once, then time the best of three.
        let _ = plan(&epoch, &info, 3, 12, &settings, 42);
        let mut best = f64::INFINITY;
        let mut result = None;
        for _ in 0..3 {
            let t = Instant::now();
            let p = plan(&epoch, &info, 3, 12, &settings, 42);
            best = best.min(t.elapsed().as_secs_f64());
            result = Some(p);
        }
        let Some(p) = result else { return };
        let mixed = (0..p.rows.len())
            .filter(|&i| {
                p.row_pieces(i)
                    .iter()
                    .map(|x| x.sample.task)
                    .collect::<BTreeSet<_>>()
                    .len()
                    >= 2
            })
            .count();
        // The reference: a sorted best-fit-decreasing packing of the same pieces, tasks ignored.
        let capacity = 2048 - p.prefix_len;
        let lens: Vec<u32> = p.pieces.iter().map(|x| x.len).collect();
        let reference_rows = best_fit_decreasing_rows(&lens, capacity).max(1);
        let pieces: u64 = lens.iter().map(|&l| u64::from(l)).sum();
        let reference_fill = (pieces + u64::from(p.prefix_len) * reference_rows as u64) as f64
            / (reference_rows as f64 * 2048.0);
        let chunks = chunk_mix(&p, capacity);
        println!(
            "{:<9} {:>9} rows  fill {:>7.3} % (best-fit decreasing {:>7.3} %)  rows with 2+ tasks \
             {:>5.1} %  mixed chunks {:>5.1} % ({:.1} % of mixable)  plan {:.3} s",
            mode.as_str(),
            p.rows.len(),
            p.fill(2048) * 100.0,
            reference_fill * 100.0,
            mixed as f64 * 100.0 / p.rows.len().max(1) as f64,
            chunks.share() * 100.0,
            chunks.share_of_mixable() * 100.0,
            best
        );
    }
}
