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

use rayon::prelude::*;

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
    let attended = attention(&q, cache, memory, shape);
    let [o] = matmul_rows_all([o_proj], &attended, rows, kernel);
    add(x, &o);

    let [gate_proj, up_proj, down_proj] = block.mlp;
    let h = rms_norm(x, d_model, &block.norms[1], shape.norm_eps);
    let [mut gate, up] = matmul_rows_all([gate_proj, up_proj], &h, rows, kernel);
    for (g, u) in gate.iter_mut().zip(&up) {
        *g = silu(*g) * u;
    }
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

/// `silu(g) = g · σ(g)`.
fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// `x += y`.
fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `Σ a_i b_i` in 16 interleaved partial sums (vectorisable; the order differs from a serial
/// sum only by f32 rounding).
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
/// values.
///
/// # Shapes
/// - q: `[batch, seq, n_heads · head_dim]` row-major
/// - output: `[batch, seq, n_heads · head_dim]` row-major
fn attention(
    q: &[f32],
    cache: &HostKv,
    memory: Option<&HostMemory>,
    shape: &StepShape,
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
    // One (row, head) pair per task: its scores, softmax and weighted sum of values.
    let attend = |task: usize, out: &mut [f32]| {
        let (r, h) = (task / n_heads, task % n_heads);
        let (b, s) = (r / seq, r % seq);
        let q = &q[r * width + h * hd..][..hd];
        let base = (b * n_kv_heads + h / group) * cache.capacity * hd;
        let n_keys = start + s + 1;
        let keys = cache.key[base..][..n_keys * hd].chunks_exact(hd);
        let values = cache.value[base..][..n_keys * hd].chunks_exact(hd);
        out.fill(0.0);
        add_attended(out, q, keys, values, scale);
        if let Some(m) = memory {
            // Slot j of row b: [b, j, kv head h / group].
            let (kv, head) = (n_kv_heads * hd, (h / group) * hd..(h / group + 1) * hd);
            let rows = b * m.n_slots * kv..(b + 1) * m.n_slots * kv;
            let keys = m.key[rows.clone()].chunks_exact(kv);
            let values = m.value[rows].chunks_exact(kv);
            let (k_head, v_head) = (head.clone(), head);
            let keys = keys.map(move |slot| &slot[k_head.clone()]);
            let values = values.map(move |slot| &slot[v_head.clone()]);
            add_attended(out, q, keys, values, scale);
        }
    };
    // [batch · seq, n_heads, head_dim] is the output's layout already.
    let mut out = vec![0.0f32; batch * seq * width];
    // Spread over the pool once the work outweighs a fork-join (≈ 2¹⁶ multiply-adds).
    let slots = memory.map_or(0, |m| m.n_slots);
    let work = batch * seq * n_heads * (start + seq + slots) * hd;
    if work < 1 << 16 {
        for (task, o) in out.chunks_exact_mut(hd).enumerate() {
            attend(task, o);
        }
    } else {
        out.par_chunks_exact_mut(hd)
            .enumerate()
            .for_each(|(task, o)| attend(task, o));
    }
    out
}

/// `out += Σ_j softmax_j(q·k_j / scale) v_j` over the keys and values given.
fn add_attended<'a>(
    out: &mut [f32],
    q: &[f32],
    keys: impl Iterator<Item = &'a [f32]>,
    values: impl Iterator<Item = &'a [f32]>,
    scale: f32,
) {
    let mut scores: Vec<f32> = keys.map(|k| dot(q, k) / scale).collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f32;
    for p in &mut scores {
        *p = (*p - max).exp();
        total += *p;
    }
    for (p, v) in scores.iter().zip(values) {
        let p = p / total;
        for (o, v) in out.iter_mut().zip(v) {
            *o += p * v;
        }
    }
}
