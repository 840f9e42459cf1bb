//! The held-out evaluation split: deterministic for a seed and a task name.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// A 64-bit FNV-1a hash, stable across builds and platforms (unlike `std`'s hasher).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// How many of `n` records go to evaluation for `fraction`: rounded, but never all of them.
pub fn eval_count(n: usize, fraction: f64) -> usize {
    if n < 2 || fraction <= 0.0 {
        return 0;
    }
    ((n as f64 * fraction).round() as usize).clamp(1, n - 1)
}

/// Marks which of `n` records are held out for evaluation. The same seed and task name always
/// give the same split; different tasks get independent splits.
pub fn eval_mask(n: usize, fraction: f64, seed: u64, task_name: &str) -> Vec<bool> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ stable_hash(task_name.as_bytes()));
    order.shuffle(&mut rng);
    let mut mask = vec![false; n];
    for &i in &order[..eval_count(n, fraction)] {
        mask[i] = true;
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_and_sized() {
        let a = eval_mask(100, 0.1, 7, "math");
        assert_eq!(a, eval_mask(100, 0.1, 7, "math"));
        assert_eq!(a.iter().filter(|&&e| e).count(), 10);
        assert_ne!(a, eval_mask(100, 0.1, 8, "math"));
        assert_ne!(a, eval_mask(100, 0.1, 7, "code"));
        assert_eq!(eval_count(1, 0.5), 0);
        assert_eq!(eval_count(3, 0.01), 1);
        assert_eq!(eval_count(3, 0.9), 2);
        assert_eq!(eval_count(10, 0.0), 0);
    }
}
