//! Rotary position embedding (RoPE), in the "rotate half" layout of Hugging Face's llama.

use burn::prelude::*;

/// Rotates query/key heads by position-dependent angles.
///
/// For head dimension pairs `(i, i + head_dim/2)` and position `p`, with
/// `θ_i = theta^(-2i/head_dim)`:
///
/// ```text
/// x'_i          = x_i cos(p θ_i) − x_{i+h/2} sin(p θ_i)
/// x'_{i+h/2}    = x_{i+h/2} cos(p θ_i) + x_i sin(p θ_i)
/// ```
///
/// so that `⟨rot(q, m), rot(k, n)⟩` depends on `m − n` only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Width of one head (even).
    pub head_dim: usize,
    /// The base θ.
    pub theta: f64,
}

impl Rope {
    /// `cos(p θ_i)` and `sin(p θ_i)` for positions `p` in `start..start + len`, each row the
    /// half-width table twice (lined up with `rotate_half`), angles in f64, values rounded to f32.
    ///
    /// # Shapes
    /// - output: `[len, head_dim]` row-major each
    pub fn host_tables(&self, start: usize, len: usize) -> [Vec<f32>; 2] {
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(len * self.head_dim);
        let mut sin = Vec::with_capacity(len * self.head_dim);
        for pos in start..start + len {
            let angles: Vec<f64> = (0..half)
                .map(|i| pos as f64 * self.theta.powf(-2.0 * i as f64 / self.head_dim as f64))
                .collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos() as f32));
                sin.extend(angles.iter().map(|a| a.sin() as f32));
            }
        }
        [cos, sin]
    }

    /// The `cos`/`sin` tables for positions `start..start + len`, computed once per forward pass and
    /// shared by every layer.
    pub fn tables<B: Backend>(
        &self,
        start: usize,
        len: usize,
        device: &B::Device,
    ) -> RopeTables<B> {
        let [cos, sin] = self.host_tables(start, len);
        let table = |values: Vec<f32>| {
            Tensor::<B, 2>::from_data(
                TensorData::new(values, [len, self.head_dim]).convert::<B::FloatElem>(),
                device,
            )
            .unsqueeze::<4>() // [1, 1, len, head_dim]
        };
        RopeTables {
            cos: table(cos),
            sin: table(sin),
        }
    }

    /// Applies the rotation to heads at positions `start..start + seq`.
    ///
    /// # Shapes
    /// - x: `[batch, n_heads, seq, head_dim]`
    /// - output: same
    pub fn apply<B: Backend>(&self, x: Tensor<B, 4>, start: usize) -> Tensor<B, 4> {
        let [_, _, seq, _] = x.dims();
        self.tables::<B>(start, seq, &x.device()).apply(x)
    }
}

/// RoPE's `cos`/`sin` for a run of positions, `[1, 1, seq, head_dim]` each.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
}

impl<B: Backend> RopeTables<B> {
    /// `x cos + rotate_half(x) sin`, with `rotate_half(x) = [−x₂, x₁]`.
    ///
    /// # Shapes
    /// - x: `[batch, n_heads, seq, head_dim]` (the positions the tables were made for)
    /// - output: same
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, _, head_dim] = x.dims();
        let half = head_dim / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend as B;
    use burn::tensor::Distribution;

    /// `⟨rot(q, m), rot(k, n)⟩` for one head.
    fn rotated_dot(rope: &Rope, q: &Tensor<B, 4>, k: &Tensor<B, 4>, m: usize, n: usize) -> f32 {
        let q = rope.apply(q.clone(), m);
        let k = rope.apply(k.clone(), n);
        (q * k).sum().into_scalar()
    }

    #[test]
    fn rotated_scores_depend_only_on_the_position_difference() {
        let _rng = crate::tests::seeded(0);
        let device = Default::default();
        let rope = Rope {
            head_dim: 16,
            theta: 10_000.0,
        };
        let q = Tensor::<B, 4>::random([1, 1, 1, 16], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<B, 4>::random([1, 1, 1, 16], Distribution::Normal(0.0, 1.0), &device);
        for (m, n) in [(5, 2), (9, 9), (3, 7)] {
            let reference = rotated_dot(&rope, &q, &k, m, n);
            for shift in [1, 17, 250] {
                let shifted = rotated_dot(&rope, &q, &k, m + shift, n + shift);
                assert!(
                    (reference - shifted).abs() < 1e-4,
                    "({m},{n})+{shift}: {reference} vs {shifted}"
                );
            }
        }
        // ... and it does depend on the difference, and position 0 is the identity.
        assert!((rotated_dot(&rope, &q, &k, 5, 2) - rotated_dot(&rope, &q, &k, 6, 2)).abs() > 1e-3);
        let unrotated = rope.apply(q.clone(), 0);
        assert!((unrotated - q).abs().max().into_scalar() < 1e-7);
    }

    #[test]
    fn pair_i_at_position_p_turns_by_p_theta_to_the_minus_2i_over_head_dim() {
        // head_dim 4, θ = 100: pair 0 = (x₀, x₂) turns by p, pair 1 = (x₁, x₃) by p · 100^(−1/2).
        let device = Default::default();
        let rope = Rope {
            head_dim: 4,
            theta: 100.0,
        };
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let rows = Tensor::<B, 1>::from_floats([x, x].concat().as_slice(), &device);
        let rotated = rope.apply(rows.reshape([1, 1, 2, 4]), 2);
        let got: Vec<f32> = rotated.into_data().to_vec().unwrap();
        let mut expected = Vec::new();
        for p in [2.0f64, 3.0] {
            let [a0, a1] = [p, p * 0.1];
            let turn = |u: f32, v: f32, a: f64| {
                let (u, v) = (u as f64, v as f64);
                [u * a.cos() - v * a.sin(), v * a.cos() + u * a.sin()]
            };
            let [x0, x2] = turn(x[0], x[2], a0);
            let [x1, x3] = turn(x[1], x[3], a1);
            expected.extend([x0, x1, x2, x3].map(|v| v as f32));
        }
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!((g - e).abs() < 1e-6, "value {i}: {g} vs {e}");
        }
    }

    #[test]
    fn rotation_preserves_norms() {
        let _rng = crate::tests::seeded(1);
        let device = Default::default();
        let rope = Rope {
            head_dim: 8,
            theta: 100.0,
        };
        let x = Tensor::<B, 4>::random([2, 3, 4, 8], Distribution::Normal(0.0, 1.0), &device);
        let norm = |t: Tensor<B, 4>| t.powf_scalar(2.0).sum_dim(3);
        let diff = (norm(rope.apply(x.clone(), 11)) - norm(x))
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 1e-4);
    }
}
