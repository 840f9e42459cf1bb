//! Vectorised `exp` for the fused kernels' inner loops: softmax over attention scores and over the
//! vocabulary, and SiLU's sigmoid.
//!
//! `f32::exp` is a call into libm per element, which the compiler cannot vectorise; in a training
//! step of the tiny model those calls were a fifth of the time (BENCHMARKS.md). Here `exp` is the
//! classic range reduction `x = n·ln 2 + r` with a degree-6 polynomial for `e^r` on
//! `|r| ≤ ln 2 / 2` (Cephes' coefficients), about 2 ulp from the true value, written without
//! branches so that each loop below compiles to AVX2 + FMA where the CPU has them (chosen at run
//! time) and to plain SSE2 elsewhere.

/// `e^x` for one value; exact 0 below `e^-87.3` (the smallest normal float), `e^88` at most.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n · LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    const LOW: f32 = -87.336_55;
    let xc = x.clamp(LOW, 88.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    let y = er * scale;
    if x.is_nan() {
        x
    } else if x < LOW {
        0.0
    } else {
        y
    }
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Defines `pub fn $name` twice over — compiled for AVX2 + FMA and for the baseline — and picks
/// one at run time.
macro_rules! multiversion {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Lanes of the reductions below: independent partial sums the compiler keeps in one register.
const LANES: usize = 8;

multiversion! {
    /// The largest value of `xs` (−∞ for none); NaN if any is NaN.
    pub fn max(xs: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut nan = false;
        let chunks = xs.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for l in 0..LANES {
                nan |= c[l].is_nan();
                acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
            }
        }
        for &x in rest {
            nan |= x.is_nan();
            acc[0] = if x > acc[0] { x } else { acc[0] };
        }
        if nan {
            return f32::NAN;
        }
        acc.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
}

/// The sum of `xs` over fixed lanes (the order, and so the result, is the same every run).
#[inline(always)]
fn lane_sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    for (l, &x) in rest.iter().enumerate() {
        acc[l] += x;
    }
    acc.iter().sum()
}

/// `out ← e^(x − shift)`: the plain loop the compiler vectorises (a loop that also sums does not
/// vectorise the polynomial).
#[inline(always)]
fn exp_map(out: &mut [f32], xs: &[f32], shift: f32) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = exp(x - shift);
    }
}

multiversion! {
    /// `Σ e^(x − shift)` over `xs`.
    pub fn sum_exp(xs: &[f32], shift: f32) -> f32 {
        const BLOCK: usize = 512;
        let mut buf = [0f32; BLOCK];
        let mut sum = 0.0;
        for block in xs.chunks(BLOCK) {
            let buf = &mut buf[..block.len()];
            exp_map(buf, block, shift);
            sum += lane_sum(buf);
        }
        sum
    }
}

multiversion! {
    /// `x ← e^(x − shift)` in place; returns the sum of the new values.
    pub fn exp_in_place(xs: &mut [f32], shift: f32) -> f32 {
        for x in xs.iter_mut() {
            *x = exp(*x - shift);
        }
        lane_sum(xs)
    }
}

multiversion! {
    /// `out ← scale · e^(x − shift)` for `out`, `xs` of one length.
    pub fn scaled_exp_into(out: &mut [f32], xs: &[f32], shift: f32, scale: f32) {
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = scale * exp(x - shift);
        }
    }
}

multiversion! {
    /// SwiGLU forward: `y ← silu(g) · u`.
    pub fn swiglu_into(y: &mut [f32], g: &[f32], u: &[f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g * sigmoid(g) * u;
        }
    }
}

multiversion! {
    /// SwiGLU backward from the output gradient `dy`: `du ← dy · silu(g)`,
    /// `dg ← dy · u · σ(g) · (1 + g · (1 − σ(g)))`.
    pub fn swiglu_grad_into(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
        let n = dg.len().min(du.len()).min(g.len()).min(u.len()).min(dy.len());
        let (dg, du, g, u, dy) = (&mut dg[..n], &mut du[..n], &g[..n], &u[..n], &dy[..n]);
        for i in 0..n {
            let s = sigmoid(g[i]);
            du[i] = dy[i] * g[i] * s;
            dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (-20_000..=20_000).map(|i| i as f32 * 0.0044).collect();
        v.extend([
            0.0,
            -0.0,
            1e-8,
            -1e-8,
            88.0,
            -87.3,
            -87.4,
            -200.0,
            f32::NEG_INFINITY,
        ]);
        v
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        for x in inputs() {
            let want = x.exp();
            let got = exp(x);
            if want < f32::MIN_POSITIVE {
                assert!(got < 1e-37, "exp({x}) = {got}, libm {want}");
                continue;
            }
            let rel = ((got - want) / want).abs();
            assert!(
                rel < 4e-7,
                "exp({x}) = {got}, libm {want}, relative error {rel}"
            );
        }
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn slice_kernels_equal_their_scalar_forms() {
        // Lengths around the lane count, so that the remainders are exercised.
        for n in [0usize, 1, 7, 8, 9, 31, 100] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
                .collect();
            let want_max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&xs), want_max);
            let shift = 1.5;
            let want_sum: f32 = xs.iter().map(|x| (x - shift).exp()).sum();
            let tol = 1e-5 * want_sum.abs().max(1.0);
            assert!((sum_exp(&xs, shift) - want_sum).abs() < tol);
            let mut inplace = xs.clone();
            let s = exp_in_place(&mut inplace, shift);
            assert!((s - want_sum).abs() < tol);
            let mut out = vec![0f32; n];
            scaled_exp_into(&mut out, &xs, shift, -2.0);
            for ((o, i), x) in out.iter().zip(&inplace).zip(&xs) {
                let want = -2.0 * (x - shift).exp();
                assert!((o - want).abs() <= 1e-6 * want.abs().max(1e-30));
                assert!((i - (x - shift).exp()).abs() <= 1e-6 * i.abs().max(1e-30));
            }
            let u: Vec<f32> = xs.iter().map(|x| 0.3 - x * 0.1).collect();
            let dy: Vec<f32> = xs.iter().map(|x| x * 0.05 + 0.2).collect();
            let mut y = vec![0f32; n];
            swiglu_into(&mut y, &xs, &u);
            let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
            swiglu_grad_into(&mut dg, &mut du, &xs, &u, &dy);
            for i in 0..n {
                let s = 1.0 / (1.0 + (-xs[i]).exp());
                let close = |a: f32, b: f32| (a - b).abs() <= 1e-6 * b.abs().max(1e-3);
                assert!(close(y[i], xs[i] * s * u[i]));
                assert!(close(du[i], dy[i] * xs[i] * s));
                assert!(close(dg[i], dy[i] * u[i] * s * (1.0 + xs[i] * (1.0 - s))));
            }
        }
        assert!(max(&[1.0, f32::NAN, 3.0]).is_nan());
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}
