//! A GGUF llama's few-row steps on the host: every block of a decoding step in one pass over
//! plain `f32` rows, between one read of the embeddings and one write of the last hidden state.
//!
//! A decoding step multiplies one row (a few for a lazy catch-up) by every weight matrix from its
//! GGUF blocks ([`crate::quantised`]), which happens on the host. Through burn, each block of
//! the step also ran ≈ 30 small tensor operations (norms, RoPE, the cache, the attention
//! products, softmax, SwiGLU, residuals) and took its activations to the host and back four
//! times; for SmolLM2 that was about as long as the products themselves. Here the same block is
//! plain loops over rows:
//!
//! - `h = x / √(mean(x²) + ε) ⊙ w_attn`, `q, k, v = h W_qᵀ, h W_kᵀ, h W_vᵀ` (from the blocks);
//! - RoPE on q and k from [`Rope::host_tables`] (the tables burn's path reads);
//! - k, v appended to the layer's cache ([`HostKv`]);
//! - per query head, `softmax(q kᵀ / √head_dim)` over the keys up to its own position, times v,
//!   plus, with memory slots ([`LayerMemory`](crate::LayerMemory)), `softmax(q k_mᵀ / √head_dim)`
//!   over the slots' keys times their values (their own softmax, no RoPE, no mask);
//! - `x += attn W_oᵀ`;
//! - `h = x / √(mean(x²) + ε) ⊙ w_mlp`, `x += (silu(h W_gateᵀ) ⊙ h W_upᵀ) W_downᵀ`;
//!
//! the operations of [`LlamaBlock`](crate::LlamaBlock)'s burn forward in the same order, so both
//! paths agree up to f32 rounding (tests: docs/reliability.md). It runs where the block products
//! run — at most [`MAX_BLOCK_ROWS`](crate::MAX_BLOCK_ROWS) rows, no gradient — and only without
//! padding, which stays on burn's path.

use crate::cache::grown_capacity;
use crate::quantised::{BlockMatrix, Kernel, matmul_rows_all};

/// One layer's cached keys and values on the host, `[batch, n_kv_heads, capacity, head_dim]`
/// row-major each, as [`LayerCache`](crate::LayerCache)'s tensors.
#[derive(Debug, Clone)]
pub(crate) struct HostKv {
    pub(crate) key: Vec<f32>,
    pub(crate) value: Vec<f32>,
    batch: usize,
    n_kv_heads: usize,
    pub(crate) capacity: usize,
    head_dim: usize,
}

impl HostKv {
    /// An empty cache (capacity 0).
    pub(crate) fn new(batch: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        Self::from_buffers([batch, n_kv_heads, 0, head_dim], Vec::new(), Vec::new())
    }

    /// A cache holding `key` and `value` of `shape` `[batch, n_kv_heads, capacity, head_dim]`.
    pub(crate) fn from_buffers(shape: [usize; 4], key: Vec<f32>, value: Vec<f32>) -> Self {
        let [batch, n_kv_heads, capacity, head_dim] = shape;
        Self {
            key,
            value,
            batch,
            n_kv_heads,
            capacity,
            head_dim,
        }
    }

    /// `[batch, n_kv_heads, capacity, head_dim]`.
    pub(crate) fn shape(&self) -> [usize; 4] {
        [self.batch, self.n_kv_heads, self.capacity, self.head_dim]
    }

    /// Writes the keys and values of positions `start..start + seq`, growing the buffers as
    /// [`LayerCache`](crate::LayerCache) does when they are full.
    ///
    /// # Shapes
    /// - key, value: `[batch, seq, n_kv_heads · head_dim]` row-major (as the products give them)
    fn write(&mut self, start: usize, seq: usize, key: &[f32], value: &[f32]) {
        let (heads, hd) = (self.n_kv_heads, self.head_dim);
        let end = start + seq;
        if end > self.capacity {
            let capacity = grown_capacity(end);
            let grow = |old: &[f32]| {
                let mut grown = vec![0.0f32; self.batch * heads * capacity * hd];
                for bg in 0..self.batch * heads {
                    grown[bg * capacity * hd..][..start * hd]
                        .copy_from_slice(&old[bg * self.capacity * hd..][..start * hd]);
                }
                grown
            };
            self.key = grow(&self.key);
            self.value = grow(&self.value);
            self.capacity = capacity;
        }
        for b in 0..self.batch {
            for s in 0..seq {
                let row = (b * seq + s) * heads * hd;
                for g in 0..heads {
                    let at = ((b * heads + g) * self.capacity + start + s) * hd;
                    self.key[at..at + hd].copy_from_slice(&key[row + g * hd..][..hd]);
                    self.value[at..at + hd].copy_from_slice(&value[row + g * hd..][..hd]);
                }
            }
        }
    }
}

/// One layer's memory slots on the host, as [`LayerMemory`](crate::LayerMemory)'s tensors.
#[derive(Debug, Clone)]
pub(crate) struct HostMemory {
    /// `[batch, n_slots, n_kv_heads · head_dim]` row-major.
    pub(crate) key: Vec<f32>,
    /// `[batch, n_slots, n_kv_heads · head_dim]` row-major.
    pub(crate) value: Vec<f32>,
    pub(crate) n_slots: usize,
}

/// What a host step reads of one llama block: its two norms' weights and its seven matrices'
/// blocks.
pub(crate) struct HostBlock<'a> {
    /// `[d_model]` each: before attention, before the MLP.
    pub(crate) norms: &'a [Vec<f32>; 2],
    /// q, k, v, o.
    pub(crate) attention: &'a [BlockMatrix; 4],
    /// gate, up, down.
    pub(crate) mlp: &'a [BlockMatrix; 3],
}

/// The step's geometry: `batch × seq` rows at positions `start..start + seq`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepShape {
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    pub(crate) start: usize,
    pub(crate) n_heads: usize,
    pub(crate) n_kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) norm_eps: f64,
}

impl StepShape {
    fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

/// `x ← x + attn(norm(x))`, then `x ← x + mlp(norm(x))` for one llama block (module docs), the
/// new keys and values written to `cache`, the queries attending to `memory`'s slots as well.
///
/// # Shapes
/// - x: `[batch, seq, d_model]` row-major
/// - cos, sin: `[seq, head_dim]` row-major, the RoPE tables of positions `start..start + seq`
pub(crate) fn block_step(
    block: &HostBlock<'_>,
    shape: &StepShape,
    [cos, sin]: [&[f32]; 2],
    x: &mut [f32],
    cache: &mut HostKv,
    memory: Option<&HostMemory>,
    kernel: Kernel,
) {
    let rows = shape.rows();
    let d_model = x.len() / rows;
    let [q_proj, k_proj, v_proj, o_proj] = block.attention;
    let h = rms_norm(x, d_model, &block.norms[0], shape.norm_eps);
    let [mut q, mut k, v] = matmul_rows_all([q_proj, k_proj, v_proj], &h, rows, kernel);
    rope(&mut q, shape, cos, sin);
    rope(&mut k, shape, cos, sin);
    cache.write(shape.start, shape.seq, &k, &v);
    let attended = attention(&q, cache, memory, shape, kernel);
    let [o] = matmul_rows_all([o_proj], &attended, rows, kernel);
    add(x, &o);

    let [gate_proj, up_proj, down_proj] = block.mlp;
    let h = rms_norm(x, d_model, &block.norms[1], shape.norm_eps);
    let [mut gate, up] = matmul_rows_all([gate_proj, up_proj], &h, rows, kernel);
    silu_times(kernel, &mut gate, &up);
    let [down] = matmul_rows_all([down_proj], &gate, rows, kernel);
    add(x, &down);
}

/// `x / √(mean(x²) + ε) ⊙ weight` per row of `width` values ([`crate::RmsNorm`]'s formula).
fn rms_norm(x: &[f32], width: usize, weight: &[f32], eps: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(width) {
        let mean_square = dot(row, row) / width as f32;
        let rms = (mean_square + eps as f32).sqrt();
        out.extend(row.iter().zip(weight).map(|(v, w)| v / rms * w));
    }
    out
}

/// `g ← silu(g) · u = g / (1 + exp(−g)) · u`, elementwise.
fn silu_times(kernel: Kernel, gate: &mut [f32], up: &[f32]) {
    let mut e: Vec<f32> = gate.iter().map(|g| -g).collect();
    exp_in_place(kernel, &mut e);
    for ((g, u), e) in gate.iter_mut().zip(up).zip(&e) {
        *g = *g / (1.0 + e) * u;
    }
}

/// `v ← exp(v)` for every value: in the CPU's widest vectors ([`simd::exp_avx512`],
/// [`simd::exp_avx2`]: the same polynomial, the same numbers) or by `f32::exp`. SwiGLU and the
/// attention's softmax take ≈ 46,000 exponentials each per SmolLM2 token (at 170 positions); one
/// by one, on the thread that runs a step's serial parts, they were a few percent of its
/// samples (docs/performance.md).
fn exp_in_place(kernel: Kernel, values: &mut [f32]) {
    match kernel {
        // SAFETY: the CPU has AVX-512F (`Kernel::detect`).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { simd::exp_in_place_avx512(values) },
        // SAFETY: the CPU has AVX2 and FMA (`Kernel::detect`).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { simd::exp_in_place_avx2(values) },
        Kernel::Portable => values.iter_mut().for_each(|v| *v = v.exp()),
    }
}

/// `Σ_v exp(l_v − max_u l_u)` over `logits`: softmax's denominator after its usual shift, so that
/// `1 / it` is the top-1 probability. The exponentials in the CPU's widest vectors
/// ([`exp_in_place`]), summed in 16 f32 lanes per 1,024 values and in f64 across those (relative
/// error ≈ 1e-6 over a 50,000-token vocabulary). NaN logits give NaN; an empty slice 0. One
/// `f64::exp` at a time, a collaborative SmolLM2 token spent ≈ 0.2 ms here (docs/performance.md).
pub fn shifted_exp_sum(logits: &[f32]) -> f64 {
    const LANES: usize = 16;
    const CHUNK: usize = 1024;
    // In lanes, so that the maxima vectorise; `f32::max` skips NaNs, which then reach the sum.
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut exact = logits.chunks_exact(LANES);
    for values in &mut exact {
        for (m, v) in lanes.iter_mut().zip(values) {
            *m = m.max(*v);
        }
    }
    for (m, v) in lanes.iter_mut().zip(exact.remainder()) {
        *m = m.max(*v);
    }
    let max = lanes.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let kernel = Kernel::detect();
    let mut buffer = [0.0f32; CHUNK];
    let mut total = 0.0f64;
    for chunk in logits.chunks(CHUNK) {
        let shifted = &mut buffer[..chunk.len()];
        for (s, l) in shifted.iter_mut().zip(chunk) {
            *s = l - max;
        }
        exp_in_place(kernel, shifted);
        let mut sums = [0.0f32; LANES];
        let mut exact = shifted.chunks_exact(LANES);
        for values in &mut exact {
            for (s, v) in sums.iter_mut().zip(values) {
                *s += v;
            }
        }
        let rest: f32 = exact.remainder().iter().sum();
        total += f64::from(rest) + sums.iter().map(|&s| f64::from(s)).sum::<f64>();
    }
    total
}

/// `x += y`.
fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `Σ a_i b_i` in 16 interleaved partial sums (the order differs from a serial sum only by f32
/// rounding).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut partial = [0.0f32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..16 {
            partial[i] += x[i] * y[i];
        }
    }
    partial.iter().sum::<f32>() + tail
}

/// Rotates each head of each row by its position's RoPE angles, halves as Hugging Face's llama
/// ([`crate::rope::RopeTables::apply`]): `x ⊙ cos + [−x₂, x₁] ⊙ sin`.
///
/// # Shapes
/// - x: `[batch, seq, heads · head_dim]` row-major; cos, sin: `[seq, head_dim]`
fn rope(x: &mut [f32], shape: &StepShape, cos: &[f32], sin: &[f32]) {
    let hd = shape.head_dim;
    let half = hd / 2;
    let width = x.len() / shape.rows();
    for (r, row) in x.chunks_exact_mut(width).enumerate() {
        let s = r % shape.seq;
        let (cos, sin) = (&cos[s * hd..][..hd], &sin[s * hd..][..hd]);
        for head in row.chunks_exact_mut(hd) {
            for i in 0..half {
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * cos[i] + -x2 * sin[i];
                head[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
            }
        }
    }
}

/// Causal attention of every query row over the cache: for query head `h` (key/value head
/// `h / group`) at position `p`, `softmax_j(q·k_j / √head_dim)` over `j ≤ p`, times `v`; plus, with
/// memory slots, `softmax_m(q·k_m / √head_dim)` over the slots of its key/value head, times their
/// values. One task per row and key/value head: the `group` query heads that read the same keys
/// read each key and value once.
///
/// # Shapes
/// - q: `[batch, seq, n_heads · head_dim]` row-major
/// - output: `[batch, seq, n_heads · head_dim]` row-major
fn attention(
    q: &[f32],
    cache: &HostKv,
    memory: Option<&HostMemory>,
    shape: &StepShape,
    kernel: Kernel,
) -> Vec<f32> {
    let StepShape {
        batch,
        seq,
        start,
        n_heads,
        n_kv_heads,
        head_dim: hd,
        ..
    } = *shape;
    let group = n_heads / n_kv_heads;
    let scale = (hd as f64).sqrt() as f32;
    let width = n_heads * hd;
    let memory = memory.filter(|m| m.n_slots > 0);
    // Query heads g·group..(g + 1)·group of row r read key/value head g: their outputs are
    // adjacent in the row, `out`.
    let attend = |task: usize, out: &mut [f32]| {
        let (r, g) = (task / n_kv_heads, task % n_kv_heads);
        let (b, s) = (r / seq, r % seq);
        let q = &q[r * width + g * group * hd..][..group * hd];
        let base = (b * n_kv_heads + g) * cache.capacity * hd;
        let n_keys = start + s + 1;
        let keys = Keys {
            key: &cache.key[base..][..n_keys * hd],
            value: &cache.value[base..][..n_keys * hd],
            stride: hd,
            offset: 0,
            head_dim: hd,
        };
        out.fill(0.0);
        add_attended(kernel, out, q, &keys, scale);
        if let Some(m) = memory {
            // Slot j of row b: [b, j, key/value head g].
            let kv = n_kv_heads * hd;
            let rows = b * m.n_slots * kv..(b + 1) * m.n_slots * kv;
            let slots = Keys {
                key: &m.key[rows.clone()],
                value: &m.value[rows],
                stride: kv,
                offset: g * hd,
                head_dim: hd,
            };
            add_attended(kernel, out, q, &slots, scale);
        }
    };
    // [batch · seq, n_heads, head_dim] is the output's layout already.
    let mut out = vec![0.0f32; batch * seq * width];
    // Spread over the team of threads (crate::team) once the work outweighs a pass (≈ 2¹⁶
    // multiply-adds).
    let slots = memory.map_or(0, |m| m.n_slots);
    let work = batch * seq * n_heads * (start + seq + slots) * hd;
    let mut tasks: Vec<(usize, &mut [f32])> =
        out.chunks_exact_mut(group * hd).enumerate().collect();
    if work < 1 << 16 {
        tasks.iter_mut().for_each(|(task, o)| attend(*task, o));
    } else {
        crate::team::for_each_mut(&mut tasks, || (), |_, (task, o)| attend(*task, o));
    }
    out
}

/// The keys and values one group of query heads attends to: key `j` is
/// `key[j·stride + offset..][..head_dim]`, its value likewise.
#[derive(Clone, Copy)]
struct Keys<'a> {
    key: &'a [f32],
    value: &'a [f32],
    stride: usize,
    offset: usize,
    head_dim: usize,
}

/// `out_h += Σ_j softmax_j(q_h·k_j / scale) v_j` for each query head `h` of a group over the same
/// keys and values ([`attended`]), the scores' dot products in the CPU's widest vectors
/// (`kernel`).
///
/// # Shapes
/// - out, q: `[group, head_dim]` row-major
fn add_attended(kernel: Kernel, out: &mut [f32], q: &[f32], keys: &Keys<'_>, scale: f32) {
    match kernel {
        // SAFETY: the CPU has AVX-512F (`Kernel::detect`).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { simd::attended_avx512(out, q, keys, scale) },
        // SAFETY: the CPU has AVX2 and FMA (`Kernel::detect`).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { simd::attended_avx2(out, q, keys, scale) },
        Kernel::Portable => attended(
            out,
            q,
            keys,
            scale,
            dot,
            |v| exp_in_place(Kernel::Portable, v),
            add_weighted,
        ),
    }
}

/// [`attended`] with the dot products of AVX-512 and AVX2 (fused multiply-adds in one vector
/// accumulator, summed across its lanes at the end; auto-vectorisation did not do it: the 16
/// partial sums of [`dot`] stayed scalar), their exponentials, and their weighted sums of the
/// values (a head's sums in registers over all keys: compiled from [`add_weighted`], each key
/// loaded, multiplied, added to and stored the head's 64 sums).
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{Keys, attended};
    use crate::quantised::avx2::horizontal_sum;

    /// [`attended`] with [`dot_avx512`].
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attended_avx512(out: &mut [f32], q: &[f32], keys: &Keys<'_>, scale: f32) {
        // SAFETY: as this function's.
        attended(
            out,
            q,
            keys,
            scale,
            |a, b| unsafe { dot_avx512(a, b) },
            |v| unsafe { exp_in_place_avx512(v) },
            |out, p, keys| unsafe { add_weighted_avx512(out, p, keys) },
        );
    }

    /// [`attended`] with [`dot_avx2`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attended_avx2(out: &mut [f32], q: &[f32], keys: &Keys<'_>, scale: f32) {
        // SAFETY: as this function's.
        attended(
            out,
            q,
            keys,
            scale,
            |a, b| unsafe { dot_avx2(a, b) },
            |v| unsafe { exp_in_place_avx2(v) },
            |out, p, keys| unsafe { add_weighted_avx2(out, p, keys) },
        );
    }

    /// Cephes' `expf`: `x = n·ln 2 + r` with `n = round(x·log₂e)` (ties to even) and `|r| ≤ ln 2 /
    /// 2` (ln 2 in two parts), `exp(x) = 2ⁿ·(1 + r + r²·P(r))`, P of degree 5; within 2 ulp of
    /// `exp` for `−87.34 ≤ x ≤ 88.37`. Beyond: 0 below `ln` of the smallest normal f32
    /// (−87.34), +∞ above `ln(f32::MAX)` (88.72), `exp(88.37)` between; NaN stays NaN. Lanes hold
    /// the same numbers in both vector widths (the same operations, fused alike).
    mod cephes {
        pub(super) const LOW: f32 = -87.336_55;
        pub(super) const HIGH: f32 = 88.376_26;
        pub(super) const OVERFLOW: f32 = 88.722_83;
        pub(super) const LOG2_E: f32 = std::f32::consts::LOG2_E;
        pub(super) const LN2_HIGH: f32 = 0.693_359_4;
        pub(super) const LN2_LOW: f32 = -2.121_944_4e-4;
        /// P's coefficients, highest degree first (the last, Cephes' 5.0000001201e-1, is 0.5 in
        /// f32).
        pub(super) const P: [f32; 6] = [
            1.987_569_1e-4,
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ];
    }

    /// `exp` of 16 lanes ([`cephes`]).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn exp_avx512(x: __m512) -> __m512 {
        let set = _mm512_set1_ps;
        // max/min return their second operand when either is NaN: x's.
        let clamped = _mm512_min_ps(set(cephes::HIGH), _mm512_max_ps(set(cephes::LOW), x));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(clamped, set(cephes::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, set(cephes::LN2_HIGH), clamped);
        let r = _mm512_fnmadd_ps(n, set(cephes::LN2_LOW), r);
        let mut p = set(cephes::P[0]);
        for c in &cephes::P[1..] {
            p = _mm512_fmadd_ps(p, r, set(*c));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), set(1.0));
        let y = _mm512_scalef_ps(y, n);
        let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, set(cephes::LOW));
        let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, set(cephes::OVERFLOW));
        _mm512_mask_blend_ps(over, _mm512_maskz_mov_ps(!under, y), set(f32::INFINITY))
    }

    /// `exp` of 8 lanes ([`cephes`]), as [`exp_avx512`]'s.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) fn exp_avx2(x: __m256) -> __m256 {
        let set = _mm256_set1_ps;
        let clamped = _mm256_min_ps(set(cephes::HIGH), _mm256_max_ps(set(cephes::LOW), x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(clamped, set(cephes::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, set(cephes::LN2_HIGH), clamped);
        let r = _mm256_fnmadd_ps(n, set(cephes::LN2_LOW), r);
        let mut p = set(cephes::P[0]);
        for c in &cephes::P[1..] {
            p = _mm256_fmadd_ps(p, r, set(*c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), set(1.0));
        // 2ⁿ from its exponent bits: −126 ≤ n ≤ 127 after the clamp.
        let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        let y = _mm256_mul_ps(y, two_n);
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, set(cephes::LOW));
        let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, set(cephes::OVERFLOW));
        _mm256_blendv_ps(_mm256_andnot_ps(under, y), set(f32::INFINITY), over)
    }

    /// `v ← exp(v)` ([`exp_avx512`]), the last `len mod 16` through a masked load and store.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_in_place_avx512(values: &mut [f32]) {
        let mut chunks = values.chunks_exact_mut(16);
        for chunk in &mut chunks {
            let p = chunk.as_mut_ptr();
            // SAFETY: 16 values at p.
            unsafe { _mm512_storeu_ps(p, exp_avx512(_mm512_loadu_ps(p))) };
        }
        let rest = chunks.into_remainder();
        let mask: __mmask16 = (1 << rest.len()) - 1;
        let p = rest.as_mut_ptr();
        // SAFETY: the mask covers the `rest.len() < 16` values at p.
        unsafe { _mm512_mask_storeu_ps(p, mask, exp_avx512(_mm512_maskz_loadu_ps(mask, p))) };
    }

    /// `v ← exp(v)` ([`exp_avx2`]), the last `len mod 8` through a copy.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_in_place_avx2(values: &mut [f32]) {
        let mut chunks = values.chunks_exact_mut(8);
        for chunk in &mut chunks {
            let p = chunk.as_mut_ptr();
            // SAFETY: 8 values at p.
            unsafe { _mm256_storeu_ps(p, exp_avx2(_mm256_loadu_ps(p))) };
        }
        let rest = chunks.into_remainder();
        let mut lanes = [0.0f32; 8];
        lanes[..rest.len()].copy_from_slice(rest);
        // SAFETY: 8 values in `lanes`.
        unsafe {
            _mm256_storeu_ps(
                lanes.as_mut_ptr(),
                exp_avx2(_mm256_loadu_ps(lanes.as_ptr())),
            )
        };
        rest.copy_from_slice(&lanes[..rest.len()]);
    }

    /// [`super::add_weighted`] in vectors: the head's sums in four vectors of 16 (the last ones
    /// masked) for 64 values at a time, each key's weight broadcast and fused into them.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn add_weighted_avx512(out: &mut [f32], p: &[f32], keys: &Keys<'_>) {
        let Keys {
            value,
            stride,
            offset,
            head_dim: hd,
            ..
        } = *keys;
        assert!(
            out.len() == hd
                && (p.is_empty() || (p.len() - 1) * stride + offset + hd <= value.len())
        );
        for first in (0..hd).step_by(64) {
            // Lanes first + 16c.. that are the head's.
            let masks: [__mmask16; 4] = std::array::from_fn(|c| {
                let left = hd.saturating_sub(first + 16 * c);
                if left >= 16 { !0 } else { (1 << left) - 1 }
            });
            let o = out.as_mut_ptr().wrapping_add(first);
            // SAFETY: masked loads and stores touch only the head's lanes (the assert above);
            // the masked-off ones do not fault.
            unsafe {
                let mut acc: [__m512; 4] = std::array::from_fn(|c| {
                    _mm512_maskz_loadu_ps(masks[c], o.wrapping_add(16 * c))
                });
                for (j, &weight) in p.iter().enumerate() {
                    let v = value.as_ptr().wrapping_add(j * stride + offset + first);
                    let weight = _mm512_set1_ps(weight);
                    for (c, acc) in acc.iter_mut().enumerate() {
                        let v = _mm512_maskz_loadu_ps(masks[c], v.wrapping_add(16 * c));
                        *acc = _mm512_fmadd_ps(weight, v, *acc);
                    }
                }
                for (c, acc) in acc.iter().enumerate() {
                    _mm512_mask_storeu_ps(o.wrapping_add(16 * c), masks[c], *acc);
                }
            }
        }
    }

    /// [`add_weighted_avx512`] in vectors of 8: eight of them for 64 values at a time.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn add_weighted_avx2(out: &mut [f32], p: &[f32], keys: &Keys<'_>) {
        let Keys {
            value,
            stride,
            offset,
            head_dim: hd,
            ..
        } = *keys;
        assert!(
            out.len() == hd
                && (p.is_empty() || (p.len() - 1) * stride + offset + hd <= value.len())
        );
        for first in (0..hd).step_by(64) {
            // All ones in the lanes first + 8c + l that are the head's.
            let masks: [__m256i; 8] = std::array::from_fn(|c| {
                let left = hd.saturating_sub(first + 8 * c).min(8) as i32;
                _mm256_cmpgt_epi32(
                    _mm256_set1_epi32(left),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                )
            });
            let o = out.as_mut_ptr().wrapping_add(first);
            // SAFETY: as in `add_weighted_avx512`.
            unsafe {
                let mut acc: [__m256; 8] =
                    std::array::from_fn(|c| _mm256_maskload_ps(o.wrapping_add(8 * c), masks[c]));
                for (j, &weight) in p.iter().enumerate() {
                    let v = value.as_ptr().wrapping_add(j * stride + offset + first);
                    let weight = _mm256_set1_ps(weight);
                    for (c, acc) in acc.iter_mut().enumerate() {
                        let v = _mm256_maskload_ps(v.wrapping_add(8 * c), masks[c]);
                        *acc = _mm256_fmadd_ps(weight, v, *acc);
                    }
                }
                for (c, acc) in acc.iter().enumerate() {
                    _mm256_maskstore_ps(o.wrapping_add(8 * c), masks[c], *acc);
                }
            }
        }
    }

    /// `Σ a_i b_i` over `a`'s length (`b` at least as long), 16 lanes at a time, the last
    /// `len mod 16` through a masked load.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        assert!(b.len() >= n);
        let (a, b) = (a.as_ptr(), b.as_ptr());
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        // SAFETY: lanes i..i + 16 < n of both (the assert above), then the masked rest.
        unsafe {
            while i + 16 <= n {
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)), acc);
                i += 16;
            }
            if i < n {
                let mask: __mmask16 = (1 << (n - i)) - 1;
                let x = _mm512_maskz_loadu_ps(mask, a.add(i));
                acc = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(mask, b.add(i)), acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    /// `Σ a_i b_i` over `a`'s length (`b` at least as long), 8 lanes at a time, the rest one by
    /// one.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        assert!(b.len() >= n);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: lanes i..i + 8 ≤ n of both (the assert above).
        unsafe {
            while i + 8 <= n {
                let x = _mm256_loadu_ps(a.as_ptr().add(i));
                acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(b.as_ptr().add(i)), acc);
                i += 8;
            }
        }
        horizontal_sum(acc) + a[i..].iter().zip(&b[i..n]).map(|(x, y)| x * y).sum::<f32>()
    }
}

/// `out_h += Σ_j p_hj v_j`, `p_hj = softmax_j(q_h·k_j / scale)`, for the query heads `h` of `q`
/// (each head's scores, maximum, exponentials, sum and weighted sum in the order of a single
/// head's), the scores from `dot`, the exponentials from `exp` (in place), each head's weighted
/// sum from `add_weighted`.
///
/// # Shapes
/// - out, q: `[group, head_dim]` row-major
#[inline(always)]
fn attended(
    out: &mut [f32],
    q: &[f32],
    keys: &Keys<'_>,
    scale: f32,
    dot: impl Fn(&[f32], &[f32]) -> f32,
    exp: impl Fn(&mut [f32]),
    add_weighted: impl Fn(&mut [f32], &[f32], &Keys<'_>),
) {
    let Keys {
        key,
        stride,
        offset,
        head_dim: hd,
        ..
    } = *keys;
    let n = key.len() / stride;
    let group = q.len() / hd;
    // scores[h·n + j] = q_h·k_j / scale, then p_hj.
    let mut scores = vec![0.0f32; group * n];
    for j in 0..n {
        let k = &key[j * stride + offset..][..hd];
        for (h, q) in q.chunks_exact(hd).enumerate() {
            scores[h * n + j] = dot(q, k) / scale;
        }
    }
    for scores in scores.chunks_exact_mut(n) {
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for p in scores.iter_mut() {
            *p -= max;
        }
        exp(scores);
        let total: f32 = scores.iter().sum();
        for p in scores.iter_mut() {
            *p /= total;
        }
    }
    for (out, p) in out.chunks_exact_mut(hd).zip(scores.chunks_exact(n)) {
        add_weighted(out, p, keys);
    }
}

/// `out += Σ_j p_j v_j` over the values of `keys` (one head's `head_dim` sums), key after key.
fn add_weighted(out: &mut [f32], p: &[f32], keys: &Keys<'_>) {
    for (j, &p) in p.iter().enumerate() {
        let v = &keys.value[j * keys.stride + keys.offset..][..keys.head_dim];
        for (o, v) in out.iter_mut().zip(v) {
            *o += p * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` values uniform in [−1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = chorus_data::rng::SplitMix64(seed);
        (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect()
    }

    /// `shifted_exp_sum` against the f64 sum of f64 exponentials: logits spread as a model's
    /// (±10) over a vocabulary that leaves a partial chunk and a partial vector, the largest in
    /// that last partial vector, then at the front; a −∞ logit adds 0; NaN gives NaN; nothing
    /// gives 0.
    #[test]
    fn the_shifted_exp_sum_is_the_f64_one() {
        let reference = |l: &[f32]| {
            let max = l
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            l.iter().map(|&v| (f64::from(v) - max).exp()).sum::<f64>()
        };
        let mut logits: Vec<f32> = values(49_159, 21).iter().map(|v| v * 10.0).collect();
        *logits.last_mut().unwrap() = 12.5;
        logits[3] = f32::NEG_INFINITY;
        for _ in 0..2 {
            let (ours, exact) = (shifted_exp_sum(&logits), reference(&logits));
            assert!(
                (ours - exact).abs() <= 1e-6 * exact,
                "{ours} against {exact}"
            );
            logits.swap(0, 49_158);
        }
        assert!(shifted_exp_sum(&[1.0, f32::NAN, 2.0]).is_nan());
        assert_eq!(shifted_exp_sum(&[]), 0.0);
        assert_eq!(shifted_exp_sum(&[3.0]), 1.0);
    }

    /// Every kernel's exponential against f64's: within 2 ulp over f32's range (a grid and
    /// random values, lengths that leave every remainder of a vector), 0, 1 and the limits
    /// exactly as documented; the two vector kernels lane for lane alike.
    #[test]
    fn exponentials_are_within_two_ulp_of_exp() {
        let mut xs: Vec<f32> = (0..=350_000).map(|i| -87.3 + i as f32 * 5e-4).collect();
        xs.extend(values(10_007, 9).iter().map(|v| v * 20.0));
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 88.3, -87.33]);
        let results: Vec<(Kernel, Vec<f32>)> = Kernel::available()
            .into_iter()
            .map(|kernel| {
                let mut out = xs.clone();
                exp_in_place(kernel, &mut out);
                (kernel, out)
            })
            .collect();
        for (kernel, out) in &results {
            for (&x, &y) in xs.iter().zip(out) {
                let exact = (x as f64).exp();
                let ulp = (exact as f32).to_bits();
                let ulp = (f32::from_bits(ulp + 1) - f32::from_bits(ulp)) as f64;
                assert!(
                    (y as f64 - exact).abs() <= 2.0 * ulp,
                    "{kernel:?}: exp({x}) = {y}, exactly {exact}"
                );
            }
            let mut limits = [f32::NAN, f32::INFINITY, 89.0, f32::NEG_INFINITY, -88.0, 0.0];
            exp_in_place(*kernel, &mut limits[..]);
            assert!(limits[0].is_nan(), "{kernel:?}");
            assert_eq!(
                limits[1..4],
                [f32::INFINITY, f32::INFINITY, 0.0],
                "{kernel:?}"
            );
            // Below the smallest normal f32: 0 from the vectors, f32::exp's subnormal.
            assert!((0.0..f32::MIN_POSITIVE).contains(&limits[4]), "{kernel:?}");
            assert_eq!(limits[5], 1.0, "{kernel:?}");
            // Each length up to two vectors: the remainders.
            for len in 0..=33 {
                let mut some = xs[..len].to_vec();
                exp_in_place(*kernel, &mut some);
                assert_eq!(some, out[..len], "{kernel:?}, {len} values");
            }
        }
        let vectors: Vec<&Vec<f32>> = results
            .iter()
            .filter(|(kernel, _)| *kernel != Kernel::Portable)
            .map(|(_, out)| out)
            .collect();
        for pair in vectors.windows(2) {
            let same = pair[0]
                .iter()
                .zip(pair[1])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "the vector kernels' exponentials differ");
        }
    }

    /// Grouped-query attention over a host cache and memory slots against its definition in f64,
    /// head by head, for every kernel this CPU runs (their own dot products); a short cache (one
    /// task after another) and a long one (tasks across the pool); a head of 20 values (a
    /// vector and a remainder).
    #[test]
    fn grouped_attention_equals_its_definition_per_head() {
        let (batch, seq, n_heads, n_kv_heads, hd, n_slots) = (2, 3, 6, 2, 20, 2);
        let group = n_heads / n_kv_heads;
        for start in [4, 300] {
            let capacity = start + seq + 1;
            let shape = StepShape {
                batch,
                seq,
                start,
                n_heads,
                n_kv_heads,
                head_dim: hd,
                norm_eps: 1e-5,
            };
            let cache_len = batch * n_kv_heads * capacity * hd;
            let cache = HostKv::from_buffers(
                [batch, n_kv_heads, capacity, hd],
                values(cache_len, 1),
                values(cache_len, 2),
            );
            let kv = n_kv_heads * hd;
            let memory = HostMemory {
                key: values(batch * n_slots * kv, 3),
                value: values(batch * n_slots * kv, 4),
                n_slots,
            };
            let q = values(batch * seq * n_heads * hd, 5);
            let outputs: Vec<Vec<f32>> = Kernel::available()
                .into_iter()
                .map(|kernel| attention(&q, &cache, Some(&memory), &shape, kernel))
                .collect();
            let softmax_sum = |out: &mut [f64], q: &[f32], keys: &[&[f32]], vals: &[&[f32]]| {
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|k| {
                        let dot: f64 = q.iter().zip(*k).map(|(a, b)| *a as f64 * *b as f64).sum();
                        dot / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (s, v) in scores.iter().zip(vals) {
                    for (o, v) in out.iter_mut().zip(*v) {
                        *o += (s - max).exp() / total * *v as f64;
                    }
                }
            };
            for b in 0..batch {
                for s in 0..seq {
                    for h in 0..n_heads {
                        let (g, row) = (h / group, b * seq + s);
                        let q = &q[(row * n_heads + h) * hd..][..hd];
                        let at = |j: usize| ((b * n_kv_heads + g) * capacity + j) * hd;
                        let keys: Vec<&[f32]> =
                            (0..=start + s).map(|j| &cache.key[at(j)..][..hd]).collect();
                        let vals: Vec<&[f32]> = (0..=start + s)
                            .map(|j| &cache.value[at(j)..][..hd])
                            .collect();
                        let mut want = vec![0.0f64; hd];
                        softmax_sum(&mut want, q, &keys, &vals);
                        let slot = |j: usize| (b * n_slots + j) * kv + g * hd;
                        let keys: Vec<&[f32]> =
                            (0..n_slots).map(|j| &memory.key[slot(j)..][..hd]).collect();
                        let vals: Vec<&[f32]> = (0..n_slots)
                            .map(|j| &memory.value[slot(j)..][..hd])
                            .collect();
                        softmax_sum(&mut want, q, &keys, &vals);
                        for (got, kernel) in outputs.iter().zip(Kernel::available()) {
                            let got = &got[(row * n_heads + h) * hd..][..hd];
                            for (got, want) in got.iter().zip(&want) {
                                assert!(
                                    (*got as f64 - want).abs() < 1e-5,
                                    "{kernel:?}, start {start}, row {row}, head {h}: {got} against {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
