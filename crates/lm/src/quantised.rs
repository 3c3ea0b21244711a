//! GGUF weights kept in their quantised blocks, for the few-row products of decoding on the CPU.
//!
//! Decoding one stream multiplies every weight matrix by one row of activations (a few with lazy
//! catch-ups or several samples), so its speed is the rate at which weights are read: from f32
//! weights SmolLM2-135M reads 538 MB per token, from its Q4_1/Q8_0 blocks ≈ 110 MB. A
//! [`BlockMatrix`] holds a GGUF matrix `W` `[rows, cols]` (outputs × inputs, blocks of 32 along
//! the inputs) and computes `y = x Wᵀ` for a few rows of `x` straight from the blocks:
//!
//! `y[i, r] = Σ_b ( d_rb · Σ_{j<32} q_rbj · x[i, 32b + j]  +  m_rb · Σ_{j<32} x[i, 32b + j] )`
//!
//! with Q4_1's `w = d·q + m`, Q4_0's `w = d·(q − 8)` (so `m = −8d`) and Q8_0's `w = d·q` (`m = 0`):
//! the product with the dequantised weights, regrouped, so equal to it up to f32 rounding. The
//! activations stay f32 (llama.cpp rounds them to 8 bits; chorus keeps its f32 forward's numbers).
//! Batched work (prefill, scoring, training) keeps using the f32 weights.

use std::fmt;
use std::sync::Arc;

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::TensorData;
use rayon::prelude::*;

use crate::gguf::{GgmlType, GgufFile, GgufTensorInfo};
use crate::names::{Heads, hf_name_of_gguf};
use crate::{LlamaConfig, LmError};

/// Elements per block in every block format.
const BLOCK: usize = 32;

/// The most rows of activations a product takes from the blocks; more (prefill, scoring) use the
/// f32 weights, where a GEMM reuses each weight across rows.
pub const MAX_BLOCK_ROWS: usize = 8;

/// How a [`BlockMatrix`] stores its quantised values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockFormat {
    /// 4-bit: 16 bytes per block, element `j < 16` the low nibble of byte `j`, `j + 16` its high
    /// nibble; `w = d·q + m`.
    Q4,
    /// 8-bit: 32 signed bytes per block; `w = d·q`.
    Q8,
}

/// A GGUF weight matrix `W` `[rows, cols]` in quantised blocks of 32 along each row, with the
/// few-row product `x Wᵀ` (module docs).
#[derive(Clone)]
pub struct BlockMatrix {
    rows: usize,
    cols: usize,
    format: BlockFormat,
    /// `d` per block, `[rows, cols / 32]`.
    scales: Vec<f32>,
    /// `m` per block, `[rows, cols / 32]` (Q4 only).
    mins: Vec<f32>,
    /// The quantised values, row after row (16 bytes per Q4 block, 32 per Q8 block).
    quants: Vec<u8>,
}

impl fmt::Debug for BlockMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BlockMatrix({:?}, {}×{})",
            self.format, self.rows, self.cols
        )
    }
}

fn f16_at(bytes: &[u8]) -> f32 {
    half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

impl BlockMatrix {
    /// The blocks of a GGUF matrix, its rows taken in the order `row_sources` gives (row `r` is
    /// the file's row `row_sources[r]`); `None` for a tensor that is not block-quantised (F32,
    /// F16, BF16), which gains nothing from this path.
    pub(crate) fn from_gguf(
        gguf: &GgufFile,
        info: &GgufTensorInfo,
        row_sources: Option<&[usize]>,
    ) -> Result<Option<Self>, LmError> {
        let format = match info.dtype {
            GgmlType::Q4_0 | GgmlType::Q4_1 => BlockFormat::Q4,
            GgmlType::Q8_0 => BlockFormat::Q8,
            _ => return Ok(None),
        };
        let shape = info.shape();
        let &[rows, cols] = &shape[..] else {
            return Err(gguf.error(format!(
                "tensor `{}` has shape {shape:?}, not a matrix",
                info.name
            )));
        };
        if cols % BLOCK != 0 {
            return Err(gguf.error(format!(
                "tensor `{}` has rows of {cols} values, not whole blocks of {BLOCK}",
                info.name
            )));
        }
        let (raw, block_bytes) = gguf.tensor_bytes(info)?;
        let blocks_per_row = cols / BLOCK;
        let quant_bytes = match format {
            BlockFormat::Q4 => BLOCK / 2,
            BlockFormat::Q8 => BLOCK,
        };
        let header = block_bytes - quant_bytes;
        let mut out = Self {
            rows,
            cols,
            format,
            scales: Vec::with_capacity(rows * blocks_per_row),
            mins: Vec::with_capacity(if format == BlockFormat::Q4 {
                rows * blocks_per_row
            } else {
                0
            }),
            quants: Vec::with_capacity(rows * blocks_per_row * quant_bytes),
        };
        let row_bytes = blocks_per_row * block_bytes;
        for r in 0..rows {
            let src = row_sources.map_or(r, |s| s[r]);
            for block in raw[src * row_bytes..(src + 1) * row_bytes].chunks_exact(block_bytes) {
                let d = f16_at(&block[0..2]);
                out.scales.push(d);
                match info.dtype {
                    GgmlType::Q4_1 => out.mins.push(f16_at(&block[2..4])),
                    GgmlType::Q4_0 => out.mins.push(-8.0 * d),
                    _ => {}
                }
                out.quants.extend_from_slice(&block[header..]);
            }
        }
        Ok(Some(out))
    }

    /// Output units (rows of `W`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input units (columns of `W`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes a product reads from this matrix.
    pub fn bytes(&self) -> usize {
        4 * (self.scales.len() + self.mins.len()) + self.quants.len()
    }

    /// `W` dequantised, `[rows, cols]` row-major (what GGUF loading gives for the same tensor).
    pub fn dequantise(&self) -> Vec<f32> {
        let blocks = self.rows * self.cols / BLOCK;
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in 0..blocks {
            let d = self.scales[b];
            match self.format {
                BlockFormat::Q4 => {
                    let (m, qs) = (self.mins[b], &self.quants[16 * b..16 * (b + 1)]);
                    out.extend(qs.iter().map(|&q| d * (q & 0x0f) as f32 + m));
                    out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
                }
                BlockFormat::Q8 => out.extend(
                    self.quants[32 * b..32 * (b + 1)]
                        .iter()
                        .map(|&q| d * (q as i8) as f32),
                ),
            }
        }
        out
    }

    /// `x Wᵀ` from the blocks (module docs), on the calling thread pool.
    ///
    /// # Shapes
    /// - x: `[n, cols]` row-major, `n ≤ MAX_BLOCK_ROWS`
    /// - output: `[n, rows]` row-major
    pub fn matmul_rows(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.matmul_rows_with(x, n, Kernel::detect())
    }

    pub(crate) fn matmul_rows_with(&self, x: &[f32], n: usize, kernel: Kernel) -> Vec<f32> {
        assert!(
            n <= MAX_BLOCK_ROWS && x.len() == n * self.cols,
            "BlockMatrix::matmul_rows: {n} rows of {} values for a {}×{} matrix",
            x.len(),
            self.rows,
            self.cols
        );
        let nb = self.cols / BLOCK;
        // Σ_j x[i, 32b + j] per row and block: the `m` term.
        let x_sums: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
        let row = |r: usize, out: &mut [f32]| {
            let blocks = r * nb..(r + 1) * nb;
            let quant_bytes = self.quants.len() / (self.rows * nb);
            let quants = &self.quants[blocks.start * quant_bytes..blocks.end * quant_bytes];
            let scales = &self.scales[blocks.clone()];
            match self.format {
                BlockFormat::Q4 => {
                    kernel.q4_row(quants, scales, &self.mins[blocks], x, &x_sums, n, out)
                }
                BlockFormat::Q8 => kernel.q8_row(quants, scales, x, n, out),
            }
        };
        // Row-major in W: outputs of one weight row for all n activation rows side by side.
        let mut by_weight_row = vec![0.0f32; self.rows * n];
        let threads = rayon::current_num_threads();
        if self.bytes() < (1 << 16) || threads == 1 {
            for (r, out) in by_weight_row.chunks_mut(n).enumerate() {
                row(r, out);
            }
        } else {
            let chunk_rows = (self.rows / (4 * threads)).max(16);
            by_weight_row
                .par_chunks_mut(chunk_rows * n)
                .enumerate()
                .for_each(|(c, chunk)| {
                    for (k, out) in chunk.chunks_mut(n).enumerate() {
                        row(c * chunk_rows + k, out);
                    }
                });
        }
        if n == 1 {
            return by_weight_row;
        }
        let mut out = vec![0.0f32; n * self.rows];
        for (r, values) in by_weight_row.chunks_exact(n).enumerate() {
            for (i, &v) in values.iter().enumerate() {
                out[i * self.rows + r] = v;
            }
        }
        out
    }
}

/// The row kernels: AVX2/FMA where the CPU has them, portable Rust elsewhere (same grouping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Self::Avx2;
        }
        Self::Portable
    }

    /// `out[i] = Σ_b d_b · Σ_j q_bj x[i, 32b + j] + m_b · x_sums[i, b]` for one Q4 weight row.
    #[allow(clippy::too_many_arguments)]
    fn q4_row(
        self,
        quants: &[u8],
        scales: &[f32],
        mins: &[f32],
        x: &[f32],
        x_sums: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        let nb = scales.len();
        assert!(
            quants.len() == 16 * nb
                && mins.len() == nb
                && x.len() >= n * 32 * nb
                && x_sums.len() >= n * nb
                && out.len() >= n
                && n <= MAX_BLOCK_ROWS
        );
        match self {
            // SAFETY: the CPU has AVX2 and FMA (`detect`), and the lengths were checked above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::q4_row(quants, scales, mins, x, x_sums, n, out) },
            Self::Portable => {
                let cols = 32 * nb;
                for (i, o) in out.iter_mut().enumerate().take(n) {
                    let x = &x[i * cols..(i + 1) * cols];
                    let mut acc = 0.0f32;
                    for b in 0..nb {
                        let qs = &quants[16 * b..16 * (b + 1)];
                        let xb = &x[32 * b..32 * (b + 1)];
                        let dot: f32 = qs
                            .iter()
                            .zip(&xb[..16])
                            .map(|(&q, &v)| (q & 0x0f) as f32 * v)
                            .chain(qs.iter().zip(&xb[16..]).map(|(&q, &v)| (q >> 4) as f32 * v))
                            .sum();
                        acc += scales[b] * dot + mins[b] * x_sums[i * nb + b];
                    }
                    *o = acc;
                }
            }
        }
    }

    /// `out[i] = Σ_b d_b · Σ_j q_bj x[i, 32b + j]` for one Q8 weight row.
    fn q8_row(self, quants: &[u8], scales: &[f32], x: &[f32], n: usize, out: &mut [f32]) {
        let nb = scales.len();
        assert!(
            quants.len() == 32 * nb
                && x.len() >= n * 32 * nb
                && out.len() >= n
                && n <= MAX_BLOCK_ROWS
        );
        match self {
            // SAFETY: as in `q4_row`.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::q8_row(quants, scales, x, n, out) },
            Self::Portable => {
                let cols = 32 * nb;
                for (i, o) in out.iter_mut().enumerate().take(n) {
                    let x = &x[i * cols..(i + 1) * cols];
                    let mut acc = 0.0f32;
                    for b in 0..nb {
                        let dot: f32 = quants[32 * b..32 * (b + 1)]
                            .iter()
                            .zip(&x[32 * b..32 * (b + 1)])
                            .map(|(&q, &v)| (q as i8) as f32 * v)
                            .sum();
                        acc += scales[b] * dot;
                    }
                    *o = acc;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::MAX_BLOCK_ROWS;

    #[target_feature(enable = "avx2,fma")]
    fn horizontal_sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// `Σ_k w_k · x[8k..8k + 8]` over the block's four vectors of weights.
    ///
    /// # Safety
    /// `x` points at 32 readable f32.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_dot(w: &[__m256; 4], x: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 32 readable values at `x`.
        unsafe {
            let t = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
            let t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), t);
            let t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), t);
            _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), t)
        }
    }

    /// See `Kernel::q4_row`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the lengths are those `Kernel::q4_row` checks.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q4_row(
        quants: &[u8],
        scales: &[f32],
        mins: &[f32],
        x: &[f32],
        x_sums: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        let nb = scales.len();
        let cols = 32 * nb;
        let low = _mm_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); MAX_BLOCK_ROWS];
        let mut min_acc = [0.0f32; MAX_BLOCK_ROWS];
        for b in 0..nb {
            // SAFETY: 16 bytes per block (checked by the caller).
            let bytes = unsafe { _mm_loadu_si128(quants.as_ptr().add(16 * b).cast()) };
            let lo = _mm_and_si128(bytes, low);
            let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
            let w = [
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
            ];
            let d = _mm256_set1_ps(scales[b]);
            for i in 0..n {
                // SAFETY: x holds n rows of `cols` values (checked by the caller).
                let t = unsafe { block_dot(&w, x.as_ptr().add(i * cols + 32 * b)) };
                acc[i] = _mm256_fmadd_ps(d, t, acc[i]);
                min_acc[i] += mins[b] * x_sums[i * nb + b];
            }
        }
        for ((out, &acc), &min_acc) in out.iter_mut().zip(&acc).zip(&min_acc).take(n) {
            *out = horizontal_sum(acc) + min_acc;
        }
    }

    /// See `Kernel::q8_row`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the lengths are those `Kernel::q8_row` checks.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q8_row(
        quants: &[u8],
        scales: &[f32],
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        let nb = scales.len();
        let cols = 32 * nb;
        let mut acc = [_mm256_setzero_ps(); MAX_BLOCK_ROWS];
        for b in 0..nb {
            let p = quants[32 * b..].as_ptr();
            // SAFETY: 32 bytes per block (checked by the caller); each load reads 8 of them.
            let w = unsafe {
                let eight = |k: usize| {
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * k).cast())))
                };
                [eight(0), eight(1), eight(2), eight(3)]
            };
            let d = _mm256_set1_ps(scales[b]);
            for (i, acc) in acc.iter_mut().enumerate().take(n) {
                // SAFETY: as in `q4_row`.
                let t = unsafe { block_dot(&w, x.as_ptr().add(i * cols + 32 * b)) };
                *acc = _mm256_fmadd_ps(d, t, *acc);
            }
        }
        for (out, &acc) in out.iter_mut().zip(&acc).take(n) {
            *out = horizontal_sum(acc);
        }
    }
}

/// `x Wᵀ` from `blocks` when it applies — `x` has at most [`MAX_BLOCK_ROWS`] rows and neither it
/// nor `weight` (the same matrix in f32, `[cols, rows]` as a burn `Linear` holds it, or
/// `[rows, cols]` for a tied embedding) needs a gradient — else `None`. The activations go to
/// the host and back, which is what the CPU backends do anyway.
///
/// # Shapes
/// - x: `[batch, seq, cols]`; output: `[batch, seq, rows]`
pub(crate) fn product_from_blocks<B: Backend>(
    blocks: Option<&BlockMatrix>,
    x: &Tensor<B, 3>,
    weight: &Tensor<B, 2>,
) -> Option<Tensor<B, 3>> {
    let blocks = blocks?;
    let [batch, seq, _] = x.dims();
    if batch * seq > MAX_BLOCK_ROWS || x.is_require_grad() || weight.is_require_grad() {
        return None;
    }
    let host: Vec<f32> = x.to_data().iter::<f32>().collect();
    let y = blocks.matmul_rows(&host, batch * seq);
    Some(Tensor::from_data(
        TensorData::new(y, [batch, seq, blocks.rows()]),
        &x.device(),
    ))
}

/// `linear(x)`, from its GGUF blocks where [`product_from_blocks`] applies.
///
/// # Shapes
/// - x: `[batch, seq, d_in]`; output: `[batch, seq, d_out]`
pub(crate) fn project<B: Backend>(
    linear: &Linear<B>,
    blocks: Option<&BlockMatrix>,
    x: Tensor<B, 3>,
) -> Tensor<B, 3> {
    match product_from_blocks(blocks, &x, &linear.weight.val()) {
        Some(y) => match &linear.bias {
            Some(bias) => y + bias.val().unsqueeze::<3>(),
            None => y,
        },
        None => linear.forward(x),
    }
}

/// The blocks of GGUF tensor `name` in chorus's row order, or `None` when it is not
/// block-quantised.
fn gguf_blocks(gguf: &GgufFile, name: &str, heads: Heads) -> Result<Option<BlockMatrix>, LmError> {
    let info = gguf
        .tensor_info(name)
        .ok_or_else(|| gguf.error(format!("missing tensor `{name}`")))?;
    let (_, layout) = hf_name_of_gguf(crate::llama::LLAMA_NAMES, name)
        .ok_or_else(|| gguf.error(format!("tensor `{name}` has no llama counterpart")))?;
    let sources = layout
        .gguf_row_sources(&info.shape(), heads)
        .map_err(|reason| gguf.error(format!("tensor `{name}`: {reason}")))?;
    BlockMatrix::from_gguf(gguf, info, sources.as_deref())
}

/// The blocks of one llama layer's seven matrices, all or none.
pub(crate) struct LayerBlocks {
    /// q, k, v, o.
    pub(crate) attention: Option<Arc<[BlockMatrix; 4]>>,
    /// gate, up, down.
    pub(crate) mlp: Option<Arc<[BlockMatrix; 3]>>,
}

/// Every block-quantised matrix of a llama GGUF in chorus's layout: per layer, and the output
/// layer (`output.weight`, or the tied `token_embd.weight`).
pub(crate) fn llama_blocks(
    gguf: &GgufFile,
    config: &LlamaConfig,
) -> Result<(Vec<LayerBlocks>, Option<Arc<BlockMatrix>>), LmError> {
    let heads = Heads {
        n_heads: config.n_heads,
        n_kv_heads: config.n_kv_heads,
    };
    let all = |names: &[String]| -> Result<Option<Vec<BlockMatrix>>, LmError> {
        names
            .iter()
            .map(|n| gguf_blocks(gguf, n, heads))
            .collect::<Result<Option<Vec<_>>, _>>()
    };
    let mut layers = Vec::with_capacity(config.n_layers);
    for i in 0..config.n_layers {
        let names = |parts: &[&str]| -> Vec<String> {
            parts
                .iter()
                .map(|p| format!("blk.{i}.{p}.weight"))
                .collect()
        };
        let attention = all(&names(&["attn_q", "attn_k", "attn_v", "attn_output"]))?
            .and_then(|v| <[BlockMatrix; 4]>::try_from(v).ok())
            .map(Arc::new);
        let mlp = all(&names(&["ffn_gate", "ffn_up", "ffn_down"]))?
            .and_then(|v| <[BlockMatrix; 3]>::try_from(v).ok())
            .map(Arc::new);
        layers.push(LayerBlocks { attention, mlp });
    }
    let output = if config.tie_embeddings {
        "token_embd.weight"
    } else {
        "output.weight"
    };
    Ok((layers, gguf_blocks(gguf, output, heads)?.map(Arc::new)))
}
