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
//! the product with the dequantised weights, regrouped, so equal to it up to f32 rounding (one row;
//! several rows in a tile multiply each block dequantised once, `w = d·q + m`). The activations
//! stay f32 (llama.cpp rounds them to 8 bits; chorus keeps its f32 forward's numbers). Kernels:
//! AVX-512, AVX2 (with FMA and F16C) or portable Rust, the fastest the CPU runs. Batched work of
//! more than [`MAX_BLOCK_ROWS`] rows (scoring, training) keeps using the f32 weights; a decoding
//! model's long prompt runs as steps of at most that many.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::TensorData;
use rayon::prelude::*;

use crate::gguf::{GgmlType, GgufFile, GgufTensorInfo};
use crate::huge_pages::HugePageBytes;
use crate::names::{Heads, hf_name_of_gguf};
use crate::{LlamaConfig, LmError};

/// Elements per block in every block format.
const BLOCK: usize = 32;

/// The most rows of activations a product takes from the blocks: a decoding step (one row per
/// sample), a lazy assistant's catch-up over the tokens it missed, a prompt (a longer one in
/// steps of this many rows). The row kernels unpack a block once per tile of up to 8 rows. More
/// rows in one forward (scoring, training) use the f32 weights.
pub const MAX_BLOCK_ROWS: usize = 64;

/// The GGUF block layouts a [`BlockMatrix`] multiplies from (as stored in the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockFormat {
    /// 18 bytes: f16 `d`, 16 bytes of nibbles (element `j < 16` the low nibble of byte `j`,
    /// `j + 16` its high nibble); `w = d·(q − 8)`.
    Q4_0,
    /// 20 bytes: f16 `d`, f16 `m`, 16 bytes of nibbles as Q4_0's; `w = d·q + m`.
    Q4_1,
    /// 34 bytes: f16 `d`, 32 signed bytes; `w = d·q`.
    Q8_0,
}

impl BlockFormat {
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// A GGUF weight matrix `W` `[rows, cols]` in its quantised blocks of 32 along each row, exactly
/// as the file stores them (rows reordered where chorus's layout differs), with the few-row
/// product `x Wᵀ` (module docs).
#[derive(Clone)]
pub struct BlockMatrix {
    rows: usize,
    cols: usize,
    format: BlockFormat,
    /// `rows × cols / 32` blocks, row after row, in memory the kernel may back with 2 MiB pages
    /// (a step reads all of them).
    blocks: HugePageBytes,
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

/// Appends the values of whole `blocks` of `format` to `out`: `w = d·q` (Q8_0), `d·(q − 8)`
/// (Q4_0), `d·q + m` (Q4_1), each block through a 32-value array so that the conversions run in
/// vectors where the caller enables them ([`Kernel::dequantise`]). `headers(block)`: the f16
/// values at the block's bytes 0 and 2 as f32 (`d`, and Q4_1's `m`). Callers make `out` large
/// enough beforehand (a matrix, a row, an embedding's rows).
#[inline(always)]
fn dequantise_blocks(
    format: BlockFormat,
    blocks: &[u8],
    out: &mut Vec<f32>,
    headers: impl Fn(&[u8]) -> [f32; 2],
) {
    for block in blocks.chunks_exact(format.block_bytes()) {
        let [d, second] = headers(block);
        let (m, offset, qs) = match format {
            BlockFormat::Q4_0 => (0.0, 8.0, &block[2..18]),
            BlockFormat::Q4_1 => (second, 0.0, &block[4..20]),
            BlockFormat::Q8_0 => {
                let qs: &[u8; BLOCK] = block[2..34].try_into().expect("34-byte Q8_0 block");
                out.extend_from_slice(&qs.map(|q| d * (q as i8) as f32));
                continue;
            }
        };
        let qs: &[u8; BLOCK / 2] = qs.try_into().expect("16 bytes of nibbles");
        let mut values = [0.0f32; BLOCK];
        for (j, &q) in qs.iter().enumerate() {
            values[j] = d * ((q & 0x0f) as f32 - offset) + m;
            values[j + BLOCK / 2] = d * ((q >> 4) as f32 - offset) + m;
        }
        out.extend_from_slice(&values);
    }
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
            GgmlType::Q4_0 => BlockFormat::Q4_0,
            GgmlType::Q4_1 => BlockFormat::Q4_1,
            GgmlType::Q8_0 => BlockFormat::Q8_0,
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
        let (raw, _) = gguf.tensor_bytes(info)?;
        let row_bytes = cols / BLOCK * format.block_bytes();
        let blocks = match row_sources {
            None => HugePageBytes::copy_of(raw),
            Some(sources) => HugePageBytes::new(sources.len() * row_bytes, |out| {
                for (&src, row) in sources.iter().zip(out.chunks_exact_mut(row_bytes)) {
                    row.copy_from_slice(&raw[src * row_bytes..(src + 1) * row_bytes]);
                }
            }),
        };
        Ok(Some(Self {
            rows,
            cols,
            format,
            blocks,
        }))
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
        self.blocks.len()
    }

    /// Where the blocks start in memory.
    #[cfg(test)]
    pub(crate) fn blocks_address(&self) -> *const u8 {
        self.blocks.as_ptr()
    }

    /// `W` dequantised, `[rows, cols]` row-major: the values GGUF loading gives for the same
    /// tensor, bit for bit.
    pub fn dequantise(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        self.dequantise_into(&self.blocks, &mut out);
        out
    }

    /// `Wᵀ` dequantised, `[cols, rows]` row-major: a `Linear`'s weight (chorus holds
    /// `[d_in, d_out]`).
    pub fn dequantise_transposed(&self) -> Vec<f32> {
        crate::names::transpose(&self.dequantise(), self.rows, self.cols)
    }

    /// Appends row `row` of `W` dequantised to `out` (an embedding's lookup), or `None` past the
    /// last row.
    pub(crate) fn dequantise_row(&self, row: usize, out: &mut Vec<f32>) -> Option<()> {
        let row_bytes = self.cols / BLOCK * self.format.block_bytes();
        let start = row.checked_mul(row_bytes)?;
        let blocks = self.blocks.get(start..start + row_bytes)?;
        self.dequantise_into(blocks, out);
        Some(())
    }

    /// Whether `W` dequantised equals `weights`, `[rows, cols]` row-major, value for value (the
    /// rows compared over the thread pool).
    pub fn equals(&self, weights: &[f32]) -> bool {
        let row_bytes = self.cols / BLOCK * self.format.block_bytes();
        weights.len() == self.rows * self.cols
            && self
                .blocks
                .par_chunks(row_bytes)
                .zip(weights.par_chunks(self.cols))
                .all(|(blocks, weights)| {
                    let mut row = Vec::with_capacity(self.cols);
                    self.dequantise_into(blocks, &mut row);
                    row == weights
                })
    }

    /// Appends the values of whole `blocks` of this matrix's format to `out`
    /// ([`dequantise_blocks`]) with the fastest kernel this CPU runs.
    fn dequantise_into(&self, blocks: &[u8], out: &mut Vec<f32>) {
        Kernel::detect().dequantise(self.format, blocks, out);
    }

    /// `x Wᵀ` from the blocks (module docs), on the calling thread pool.
    ///
    /// # Shapes
    /// - x: `[n, cols]` row-major, `n ≤ MAX_BLOCK_ROWS`
    /// - output: `[n, rows]` row-major
    pub fn matmul_rows(&self, x: &[f32], n: usize) -> Vec<f32> {
        let [y] = matmul_rows_all([self], x, n, Kernel::detect());
        y
    }
}

/// `x W_kᵀ` for every matrix `W_k` (all `cols` wide) from the row kernels ([`Kernel::rows`]), in
/// one parallel pass over all their rows: the products of one activation with q, k and v (or
/// gate and up) cost one fork-join.
///
/// # Shapes
/// - x: `[n, cols]` row-major, `n ≤ MAX_BLOCK_ROWS`
/// - output k: `[n, rows_k]` row-major
pub(crate) fn matmul_rows_all<const N: usize>(
    matrices: [&BlockMatrix; N],
    x: &[f32],
    n: usize,
    kernel: Kernel,
) -> [Vec<f32>; N] {
    let cols = matrices[0].cols;
    assert!(
        n <= MAX_BLOCK_ROWS && x.len() == n * cols && matrices.iter().all(|m| m.cols == cols),
        "BlockMatrix products: {n} rows of {} values for matrices of {:?}",
        x.len(),
        matrices.map(|m| (m.rows, m.cols))
    );
    // Σ_j x[i, 32b + j] per row and block: the `m` term of the 4-bit formats, for the kernels
    // that add it per block rather than folding `m` into the weights.
    let x_sums: Vec<f32> = if matrices.iter().any(|m| kernel.reads_x_sums(m.format, n)) {
        x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect()
    } else {
        Vec::new()
    };
    // Weight rows `first..first + out.len() / n` of `m`.
    let rows = |m: &BlockMatrix, first: usize, out: &mut [f32]| {
        let row_bytes = m.cols / BLOCK * m.format.block_bytes();
        let blocks = &m.blocks[first * row_bytes..][..out.len() / n * row_bytes];
        kernel.rows(m.format, blocks, row_bytes, x, &x_sums, n, out);
    };
    let threads = crate::team::participants();
    let bytes: usize = matrices.iter().map(|m| m.bytes()).sum();
    if bytes < (1 << 16) || threads == 1 {
        return matrices.map(|m| {
            let mut by_weight_row = vec![0.0f32; m.rows * n];
            rows(m, 0, &mut by_weight_row);
            let mut out = vec![0.0f32; n * m.rows];
            // SAFETY: `out` is `[n, m.rows]` and borrowed by nothing else.
            unsafe { write_columns(&by_weight_row, n, out.as_mut_ptr(), m.rows, 0) };
            out
        });
    }
    let total_rows: usize = matrices.iter().map(|m| m.rows).sum();
    // One chunk per participant of the team (`team::for_each_mut` balances the rest): finer
    // chunks, each a fresh stream for the prefetchers, made one-row steps slower (at 2 and 4
    // chunks per thread ≈ 1.04 and 1.05× the time of one; docs/performance.md).
    let chunk_rows = (total_rows / threads).max(16);
    by_chunks_of_weight_rows(matrices, n, chunk_rows, rows)
}

/// `out_k = x W_kᵀ` for every matrix, `[n, rows_k]` row-major each, from `product(m, first,
/// outputs)`, which fills `outputs` with `W xᵀ` for weight rows `first..first +
/// outputs.len() / n` of `m` (`[weight rows, n]` row-major: a weight row's outputs side by side):
/// chunks of `chunk_rows` weight rows of all matrices shared out over the team of threads
/// ([`crate::team`]), each participant with a buffer for its chunk, which it writes into its
/// columns of `out_k` ([`write_columns`]) while the chunk is in its caches. Transposed after
/// the pass by the calling thread alone, the outputs of a 16-row step took ≈ 11 % of its time,
/// with the other core idle (docs/performance.md).
fn by_chunks_of_weight_rows<const N: usize>(
    matrices: [&BlockMatrix; N],
    n: usize,
    chunk_rows: usize,
    product: impl Fn(&BlockMatrix, usize, &mut [f32]) + Sync,
) -> [Vec<f32>; N] {
    let mut outputs = matrices.map(|m| vec![0.0f32; n * m.rows]);
    if n == 1 {
        // One row: both layouts are the same, so each chunk is written in place.
        let mut chunks: Vec<(&BlockMatrix, usize, &mut [f32])> = outputs
            .iter_mut()
            .zip(matrices)
            .flat_map(|(outputs, m)| {
                outputs
                    .chunks_mut(chunk_rows)
                    .enumerate()
                    .map(move |(c, chunk)| (m, c * chunk_rows, chunk))
            })
            .collect();
        crate::team::for_each_mut(
            &mut chunks,
            || (),
            |_, (m, first, chunk)| product(m, *first, chunk),
        );
        return outputs;
    }
    let targets = outputs.each_mut().map(|o| Columns(o.as_mut_ptr()));
    // (matrix, first weight row, weight rows)
    let mut chunks: Vec<(usize, usize, usize)> = matrices
        .iter()
        .enumerate()
        .flat_map(|(k, m)| {
            (0..m.rows)
                .step_by(chunk_rows)
                .map(move |first| (k, first, chunk_rows.min(m.rows - first)))
        })
        .collect();
    crate::team::for_each_mut(&mut chunks, Vec::new, |buffer, &mut (k, first, rows)| {
        let m = matrices[k];
        buffer.clear();
        buffer.resize(rows * n, 0.0);
        product(m, first, buffer);
        // SAFETY: `targets[k]` is `outputs[k]`, `[n, m.rows]`, alive and not otherwise
        // borrowed until the pass returns; columns `first..first + rows` of its rows are
        // this chunk's alone (the chunks of a matrix do not overlap).
        unsafe { write_columns(buffer, n, targets[k].0, m.rows, first) };
    });
    outputs
}

/// The outputs of a matrix, written column-chunk by column-chunk by the participants of a pass.
struct Columns(*mut f32);

// SAFETY: every participant writes only the columns of its own chunks (`by_chunks_of_weight_rows`).
unsafe impl Sync for Columns {}

/// `out[i, first + r] = chunk[r, i]`: a chunk of `W xᵀ`, `[rows, n]`, into columns `first..first
/// + rows` of `x Wᵀ`, `[n, width]` — in blocks of 16 weight rows, whose outputs stay in the L1
/// cache while each of the n rows of `out` takes 16 consecutive values.
///
/// # Safety
/// `out` points at `n · width` writable f32 that nothing else reads or writes meanwhile in
/// columns `first..first + rows`, `first + rows ≤ width`.
unsafe fn write_columns(chunk: &[f32], n: usize, out: *mut f32, width: usize, first: usize) {
    const BLOCK_ROWS: usize = 16;
    let rows = chunk.len() / n;
    debug_assert!(chunk.len() == rows * n && first + rows <= width);
    for (b, block) in chunk.chunks(BLOCK_ROWS * n).enumerate() {
        for i in 0..n {
            // SAFETY: row i's columns from `first + 16 b` on, inside the caller's columns.
            let dst = unsafe { out.add(i * width + first + b * BLOCK_ROWS) };
            for (r, value) in block.iter().skip(i).step_by(n).enumerate() {
                // SAFETY: r < the block's weight rows, so within the caller's columns.
                unsafe { *dst.add(r) = *value };
            }
        }
    }
}

/// The row kernels: AVX2/FMA/F16C where the CPU has them, portable Rust elsewhere (same grouping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// The fastest kernel this CPU runs (detected once per process: it is asked for on every
    /// product and every embedding row).
    pub(crate) fn detect() -> Self {
        static FASTEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *FASTEST.get_or_init(|| {
            *Self::available()
                .last()
                .expect("the portable kernel runs anywhere")
        })
    }

    /// Every kernel this CPU runs, slowest first.
    pub(crate) fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut kernels = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            kernels.push(Self::Avx2);
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(Self::Avx512);
            }
        }
        kernels
    }

    /// The f32 lanes of this kernel's vectors.
    pub(crate) fn lanes(self) -> usize {
        match self {
            Self::Portable => 1,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => 8,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => 16,
        }
    }

    /// [`dequantise_blocks`] compiled for this kernel's instruction set, so that its per-block
    /// loops run in AVX2 or AVX-512 vectors (the same operations in the same order, so the same
    /// values as the portable loop's).
    fn dequantise(self, format: BlockFormat, blocks: &[u8], out: &mut Vec<f32>) {
        match self {
            // SAFETY: the CPU has AVX2, FMA and F16C (`detect`).
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::dequantise(format, blocks, out) },
            // SAFETY: the CPU has AVX-512F, FMA and F16C (`detect`).
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { avx512::dequantise(format, blocks, out) },
            Self::Portable => {
                dequantise_blocks(format, blocks, out, |b| [f16_at(b), f16_at(&b[2..])]);
            }
        }
    }

    /// Whether [`Kernel::rows`] reads `x_sums` for `n` rows of `format`: the portable kernel and
    /// AVX2's one-row kernel add `m · Σ_j x_j` per 4-bit block; the tiles and AVX-512's one-row
    /// kernel fold `m` into the weights they multiply (`d·q + m`), so the sums need not be made.
    fn reads_x_sums(self, format: BlockFormat, n: usize) -> bool {
        format != BlockFormat::Q8_0
            && match self {
                Self::Portable => true,
                #[cfg(target_arch = "x86_64")]
                Self::Avx2 => n == 1,
                #[cfg(target_arch = "x86_64")]
                Self::Avx512 => false,
            }
    }

    /// `out[r·n + i] = Σ_b d_rb · Σ_j q_rbj x[i, 32b + j] + m_rb · x_sums[i, b]` for the weight rows
    /// `r` whose blocks are `blocks`, `row_bytes` each (`m = −8d` for Q4_0, none for Q8_0): one call
    /// per chunk of rows, so that the checks and the dispatch are not paid per row.
    #[allow(clippy::too_many_arguments)]
    fn rows(
        self,
        format: BlockFormat,
        blocks: &[u8],
        row_bytes: usize,
        x: &[f32],
        x_sums: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        let bb = format.block_bytes();
        let nb = row_bytes / bb;
        assert!(
            row_bytes == nb * bb
                && blocks.len().is_multiple_of(row_bytes)
                && x.len() >= n * BLOCK * nb
                && (x_sums.len() >= n * nb || !self.reads_x_sums(format, n))
                && out.len() == blocks.len() / row_bytes * n
                && n <= MAX_BLOCK_ROWS
        );
        match self {
            // SAFETY: the CPU has AVX2, FMA and F16C (`detect`); the lengths were checked above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::rows(format, blocks, row_bytes, x, x_sums, n, out) },
            // SAFETY: the CPU has AVX-512F, FMA and F16C (`detect`); the lengths were checked
            // above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { avx512::rows(format, blocks, row_bytes, x, x_sums, n, out) },
            Self::Portable => {
                for (blocks, out) in blocks.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
                    portable_row(format, blocks, x, x_sums, n, out);
                }
            }
        }
    }
}

/// One weight row of [`Kernel::rows`] in portable Rust.
fn portable_row(
    format: BlockFormat,
    blocks: &[u8],
    x: &[f32],
    x_sums: &[f32],
    n: usize,
    out: &mut [f32],
) {
    let bb = format.block_bytes();
    let nb = blocks.len() / bb;
    let cols = BLOCK * nb;
    for (i, o) in out.iter_mut().enumerate().take(n) {
        let x = &x[i * cols..(i + 1) * cols];
        let mut acc = 0.0f32;
        for (b, block) in blocks.chunks_exact(bb).enumerate() {
            let d = f16_at(block);
            let xb = &x[BLOCK * b..BLOCK * (b + 1)];
            let (m, qs) = match format {
                BlockFormat::Q4_0 => (-8.0 * d, &block[2..]),
                BlockFormat::Q4_1 => (f16_at(&block[2..]), &block[4..]),
                BlockFormat::Q8_0 => {
                    let dot: f32 = block[2..]
                        .iter()
                        .zip(xb)
                        .map(|(&q, &v)| (q as i8) as f32 * v)
                        .sum();
                    acc += d * dot;
                    continue;
                }
            };
            let dot: f32 = qs
                .iter()
                .zip(&xb[..16])
                .map(|(&q, &v)| (q & 0x0f) as f32 * v)
                .chain(qs.iter().zip(&xb[16..]).map(|(&q, &v)| (q >> 4) as f32 * v))
                .sum();
            acc += d * dot + m * x_sums[i * nb + b];
        }
        *o = acc;
    }
}

/// Rows per tile of the SIMD kernels: a tile's accumulators stay in registers, a block's weights
/// are unpacked once per tile, and a tile's activations stay in the L1 cache (8 rows of 1,536
/// f32 are 48 KB; 16-row tiles were slower with AVX-512's 32 registers).
#[cfg(target_arch = "x86_64")]
const TILE: usize = 8;

/// `[even, odd]` after `acc ← add(b, acc)` over the blocks `b < nb`, the even blocks into the
/// first accumulator and the odd ones into the second. A one-row kernel's running sum is a chain
/// of fused multiply-adds, one per block; as one chain, each block waited for the previous one's
/// (≈ 4 cycles), which held the Q8_0 kernel to ≈ 14 GB/s a core; two chains overlap.
#[inline(always)]
fn two_chains<A: Copy>(nb: usize, zero: A, mut add: impl FnMut(usize, A) -> A) -> [A; 2] {
    let [mut even, mut odd] = [zero; 2];
    let mut b = 0;
    while b + 1 < nb {
        even = add(b, even);
        odd = add(b + 1, odd);
        b += 2;
    }
    if b < nb {
        even = add(b, even);
    }
    [even, odd]
}

/// Calls `tile(first_row, rows)` for each tile of the `n` rows of `x`, split evenly (10 rows: 5 +
/// 5).
#[cfg(target_arch = "x86_64")]
fn tiles(n: usize, mut tile: impl FnMut(usize, usize)) {
    let count = n.div_ceil(TILE);
    let mut start = 0;
    for t in 0..count {
        let rows = (n - start) / (count - t);
        tile(start, rows);
        start += rows;
    }
}

/// Weight rows per group of [`tiles_by_row_groups`]: 16 rows of Q4_1 blocks over 1,536 inputs are
/// 15 KB, which stay in the L1 cache while every tile of activations passes them.
#[cfg(target_arch = "x86_64")]
const ROW_GROUP: usize = 16;

/// Calls `tile(blocks, first, rows, out)` for every `weight_rows` consecutive weight rows (their
/// `blocks`, `row_bytes` each — fewer at the end of a group; `out` points at the first one's
/// output for row `first` of `x`, the next one's `n` further) and every tile of the `n` rows of
/// `x` ([`tiles`]): the weight rows in groups of [`ROW_GROUP`], each group's rows passed by every
/// tile in turn. So the activations are read from the caches once per group, not once per
/// weight row: with all 64 rows a tile at a time per weight row, a step of 64 rows read ≈ 27 GB
/// of activations from the L2 cache for SmolLM2 and took twice as long a row as burn's f32 GEMM.
#[cfg(target_arch = "x86_64")]
fn tiles_by_row_groups(
    blocks: &[u8],
    row_bytes: usize,
    weight_rows: usize,
    n: usize,
    out: &mut [f32],
    mut tile: impl FnMut(&[u8], usize, usize, *mut f32),
) {
    let groups = blocks.chunks(ROW_GROUP * row_bytes);
    for (group, out) in groups.zip(out.chunks_mut(ROW_GROUP * n)) {
        tiles(n, |first, rows| {
            let chunks = group.chunks(weight_rows * row_bytes);
            for (blocks, out) in chunks.zip(out.chunks_mut(weight_rows * n)) {
                tile(blocks, first, rows, out[first..].as_mut_ptr());
            }
        });
    }
}

/// Dispatches a tile of `$rows` (1 to [`TILE`]) rows to `$f::<R>($args)`.
#[cfg(target_arch = "x86_64")]
macro_rules! with_tile {
    ($rows:expr, $f:ident($($args:expr),*)) => {
        match $rows {
            1 => $f::<1>($($args),*),
            2 => $f::<2>($($args),*),
            3 => $f::<3>($($args),*),
            4 => $f::<4>($($args),*),
            5 => $f::<5>($($args),*),
            6 => $f::<6>($($args),*),
            7 => $f::<7>($($args),*),
            _ => $f::<8>($($args),*),
        }
    };
}

/// The row kernels of a SIMD module (`Kernel::rows`' lengths checked by the caller, the CPU
/// running `$features`): one row by the module's `q4_one` or `q8_one`, more in tiles by its
/// `q4_tile::<R>` or `q8_tile::<R>`.
#[cfg(target_arch = "x86_64")]
macro_rules! row_kernels {
    ($features:literal) => {
        /// See `Kernel::dequantise`: `super::dequantise_blocks` compiled with the module's
        /// features.
        ///
        /// # Safety
        /// The CPU has the module's features.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn dequantise(
            format: super::BlockFormat,
            blocks: &[u8],
            out: &mut Vec<f32>,
        ) {
            super::dequantise_blocks(format, blocks, out, |block| {
                // Every block format has at least 4 bytes.
                let bits = i32::from_le_bytes([block[0], block[1], block[2], block[3]]);
                // F16C: both halves in one conversion (exact, as `half`'s).
                let h = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
                [_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_movehdup_ps(h))]
            })
        }

        /// See `Kernel::rows`: the module's kernel for `format`.
        ///
        /// # Safety
        /// The CPU has the module's features; the lengths are those `Kernel::rows` checks.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn rows(
            format: super::BlockFormat,
            blocks: &[u8],
            row_bytes: usize,
            x: &[f32],
            x_sums: &[f32],
            n: usize,
            out: &mut [f32],
        ) {
            // SAFETY: as this function's.
            unsafe {
                match format {
                    super::BlockFormat::Q8_0 => q8_rows(blocks, row_bytes, x, n, out),
                    super::BlockFormat::Q4_0 | super::BlockFormat::Q4_1 => q4_rows(
                        format == super::BlockFormat::Q4_1,
                        blocks,
                        row_bytes,
                        x,
                        x_sums,
                        n,
                        out,
                    ),
                }
            }
        }

        /// See `Kernel::rows`, for Q4_1 (`with_min`) or Q4_0 blocks: `q4_one` per weight row,
        /// or `q4_tile`s over [`super::tiles_by_row_groups`].
        ///
        /// # Safety
        /// The CPU has the module's features; the lengths are those `Kernel::rows` checks.
        #[target_feature(enable = $features)]
        unsafe fn q4_rows(
            with_min: bool,
            blocks: &[u8],
            row_bytes: usize,
            x: &[f32],
            x_sums: &[f32],
            n: usize,
            out: &mut [f32],
        ) {
            if n == 1 {
                for (blocks, out) in blocks.chunks_exact(row_bytes).zip(out) {
                    // SAFETY: as this function's, for one of its rows.
                    *out = unsafe { q4_one(with_min, blocks, x, x_sums) };
                }
                return;
            }
            let cols = 32 * (row_bytes / if with_min { 20 } else { 18 });
            super::tiles_by_row_groups(
                blocks,
                row_bytes,
                WEIGHT_ROWS_PER_TILE,
                n,
                out,
                |blocks, first, rows, out| {
                    // SAFETY: rows first..first + rows of x exist (checked by the caller for all n
                    // rows); `out` holds them for each weight row in `blocks`, `n` apart.
                    unsafe {
                        with_tile!(
                            rows,
                            q4_tile(
                                with_min,
                                blocks,
                                row_bytes,
                                x.as_ptr().add(first * cols),
                                out,
                                n
                            )
                        )
                    }
                },
            );
        }

        /// See `Kernel::rows`, for Q8_0 blocks: `q8_one` per weight row, or `q8_tile`s over
        /// [`super::tiles_by_row_groups`].
        ///
        /// # Safety
        /// As `q4_rows`.
        #[target_feature(enable = $features)]
        unsafe fn q8_rows(blocks: &[u8], row_bytes: usize, x: &[f32], n: usize, out: &mut [f32]) {
            if n == 1 {
                for (blocks, out) in blocks.chunks_exact(row_bytes).zip(out) {
                    // SAFETY: as this function's, for one of its rows.
                    *out = unsafe { q8_one(blocks, x) };
                }
                return;
            }
            let cols = 32 * (row_bytes / 34);
            super::tiles_by_row_groups(
                blocks,
                row_bytes,
                WEIGHT_ROWS_PER_TILE,
                n,
                out,
                |blocks, first, rows, out| {
                    // SAFETY: as in `q4_rows`.
                    unsafe {
                        with_tile!(
                            rows,
                            q8_tile(blocks, row_bytes, x.as_ptr().add(first * cols), out, n)
                        )
                    }
                },
            );
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    row_kernels!("avx2,fma,f16c");

    /// `Σ` of the 8 lanes of `v`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn horizontal_sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// The two f16 values at `p` as f32 (lanes 0 and 1).
    ///
    /// # Safety
    /// `p` points at 4 readable bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn two_halves(p: *const u8) -> __m128 {
        // SAFETY: the caller guarantees 4 readable bytes.
        _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe {
            p.cast::<i32>().read_unaligned()
        }))
    }

    /// Adds `w · x[i, block]` for the `R` rows of a tile: `w` the block's 32 dequantised
    /// weights, `x` the first row's values of the block, rows `cols` apart. With at most 4 rows
    /// each row has two accumulators (`even`, `odd`), so that a row's chain of fused
    /// multiply-adds is half as long; with more, the rows' chains overlap one another.
    ///
    /// # Safety
    /// `x` points at R rows of 32 readable f32, `cols` apart.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn accumulate<const R: usize>(
        w: &[__m256; 4],
        x: *const f32,
        cols: usize,
        even: &mut [__m256; R],
        odd: &mut [__m256; R],
    ) {
        for i in 0..R {
            // SAFETY: the caller guarantees 32 readable values at each row.
            unsafe {
                let x = x.add(i * cols);
                if R <= 4 {
                    even[i] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), even[i]);
                    odd[i] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), odd[i]);
                    even[i] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), even[i]);
                    odd[i] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), odd[i]);
                } else {
                    let mut a = even[i];
                    for (k, w) in w.iter().enumerate() {
                        a = _mm256_fmadd_ps(*w, _mm256_loadu_ps(x.add(8 * k)), a);
                    }
                    even[i] = a;
                }
            }
        }
    }

    /// `out[i] = Σ lanes of even[i] + odd[i]`.
    ///
    /// # Safety
    /// `out` points at R writable f32.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_sums<const R: usize>(even: &[__m256; R], odd: &[__m256; R], out: *mut f32) {
        for i in 0..R {
            // SAFETY: the caller guarantees R values at `out`.
            unsafe { *out.add(i) = horizontal_sum(_mm256_add_ps(even[i], odd[i])) };
        }
    }

    /// One weight row of `q4_rows` with one row of x, `Σ_b d_b · (q_b · x_b) + m_b · Σ x_b`: for a single row, scaling
    /// the dot product of the raw nibbles beats dequantising the block first.
    ///
    /// # Safety
    /// As `q4_rows`, for one weight row and n = 1.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_one(with_min: bool, blocks: &[u8], x: &[f32], x_sums: &[f32]) -> f32 {
        let bb = if with_min { 20 } else { 18 };
        let nb = blocks.len() / bb;
        // Checked here, once per row, rather than by the caller: only this kernel and the
        // portable one read the sums (`Kernel::reads_x_sums`).
        let x_sums = &x_sums[..nb];
        let low = _mm256_set1_epi32(0x0f);
        let zero = (_mm256_setzero_ps(), 0.0f32);
        let [even, odd] = super::two_chains(nb, zero, |b, (acc, min_acc)| {
            // SAFETY: block b is `bb` readable bytes (checked by the caller), x holds `32 nb`
            // values; x_sums holds `nb` (sliced above).
            unsafe {
                let block = blocks.as_ptr().add(b * bb);
                let header = _mm_cvtph_ps(_mm_cvtsi32_si128(if with_min {
                    block.cast::<i32>().read_unaligned()
                } else {
                    block.cast::<u16>().read_unaligned() as i32
                }));
                let d = _mm_cvtss_f32(header);
                let m = if with_min {
                    _mm_cvtss_f32(_mm_movehdup_ps(header))
                } else {
                    -8.0 * d
                };
                let qs = block.add(bb - 16);
                let first = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.cast()));
                let second = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.add(8).cast()));
                let xb = x.as_ptr().add(32 * b);
                let t = _mm256_mul_ps(
                    _mm256_cvtepi32_ps(_mm256_and_si256(first, low)),
                    _mm256_loadu_ps(xb),
                );
                let t = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_and_si256(second, low)),
                    _mm256_loadu_ps(xb.add(8)),
                    t,
                );
                let t = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_srli_epi32(first, 4)),
                    _mm256_loadu_ps(xb.add(16)),
                    t,
                );
                let t = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_srli_epi32(second, 4)),
                    _mm256_loadu_ps(xb.add(24)),
                    t,
                );
                (
                    _mm256_fmadd_ps(_mm256_set1_ps(d), t, acc),
                    min_acc + m * *x_sums.get_unchecked(b),
                )
            }
        });
        horizontal_sum(_mm256_add_ps(even.0, odd.0)) + (even.1 + odd.1)
    }

    /// One weight row of `q8_rows` with one row of x, `Σ_b d_b · (q_b · x_b)`: the dot product of the raw bytes, scaled.
    ///
    /// # Safety
    /// As `q8_rows`, for one weight row and n = 1.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_one(blocks: &[u8], x: &[f32]) -> f32 {
        let nb = blocks.len() / 34;
        let [even, odd] = super::two_chains(nb, _mm256_setzero_ps(), |b, acc| {
            // SAFETY: block b is 34 readable bytes (checked by the caller): an f16 scale (read
            // with the following two bytes, ignored), then 32 signed bytes read 8 at a time; x
            // holds `32 nb` values.
            unsafe {
                let block = blocks.as_ptr().add(b * 34);
                let d = _mm256_broadcastss_ps(two_halves(block));
                let xb = x.as_ptr().add(32 * b);
                let mut t = _mm256_setzero_ps();
                for k in 0..4 {
                    let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(block.add(2 + 8 * k).cast()));
                    t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_loadu_ps(xb.add(8 * k)), t);
                }
                _mm256_fmadd_ps(d, t, acc)
            }
        });
        horizontal_sum(_mm256_add_ps(even, odd))
    }

    /// Weight rows per tile: one. With 16 vector registers a second weight row's accumulators
    /// would not fit beside the first's.
    const WEIGHT_ROWS_PER_TILE: usize = 1;

    /// One weight row of `q4_rows` with the `R` rows at `x` (`out` at the same rows): each block dequantised once,
    /// `w_j = d·q_j + m`, then multiplied with every row.
    ///
    /// # Safety
    /// As `q4_rows`, for one weight row ([`WEIGHT_ROWS_PER_TILE`]), R rows at `x` and `out` at them.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_tile<const R: usize>(
        with_min: bool,
        blocks: &[u8],
        _row_bytes: usize,
        x: *const f32,
        out: *mut f32,
        _out_stride: usize,
    ) {
        let bb = if with_min { 20 } else { 18 };
        let nb = blocks.len() / bb;
        let cols = 32 * nb;
        let low = _mm256_set1_epi32(0x0f);
        let mut even = [_mm256_setzero_ps(); R];
        let mut odd = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            // SAFETY: block b is `bb` readable bytes (checked by the caller): 2 or 4 bytes of
            // f16 header, then 16 bytes of nibbles read as two halves of 8; x holds R rows of
            // `cols` values.
            unsafe {
                let block = blocks.as_ptr().add(b * bb);
                let header = _mm_cvtph_ps(_mm_cvtsi32_si128(if with_min {
                    block.cast::<i32>().read_unaligned()
                } else {
                    block.cast::<u16>().read_unaligned() as i32
                }));
                let d = _mm256_broadcastss_ps(header);
                let m = if with_min {
                    _mm256_broadcastss_ps(_mm_movehdup_ps(header))
                } else {
                    _mm256_mul_ps(_mm256_set1_ps(-8.0), d)
                };
                let qs = block.add(bb - 16);
                // Bytes 0..8 and 8..16, one per 32-bit lane: low nibbles are elements 0..16,
                // high nibbles 16..32.
                let first = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.cast()));
                let second = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.add(8).cast()));
                let weights = |q: __m256i| _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q), m);
                let w = [
                    weights(_mm256_and_si256(first, low)),
                    weights(_mm256_and_si256(second, low)),
                    weights(_mm256_srli_epi32(first, 4)),
                    weights(_mm256_srli_epi32(second, 4)),
                ];
                accumulate(&w, x.add(32 * b), cols, &mut even, &mut odd);
            }
        }
        // SAFETY: out holds R values.
        unsafe { store_sums(&even, &odd, out) };
    }

    /// One weight row of `q8_rows` with the `R` rows at `x` (`out` at the same rows): each block dequantised once,
    /// `w_j = d·q_j`, then multiplied with every row.
    ///
    /// # Safety
    /// As `q8_rows`, for one weight row, R rows at `x` and `out` at them.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_tile<const R: usize>(
        blocks: &[u8],
        _row_bytes: usize,
        x: *const f32,
        out: *mut f32,
        _out_stride: usize,
    ) {
        let nb = blocks.len() / 34;
        let cols = 32 * nb;
        let mut even = [_mm256_setzero_ps(); R];
        let mut odd = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            // SAFETY: block b is 34 readable bytes (checked by the caller): an f16 scale (read
            // with the following two bytes, ignored), then 32 signed bytes read 8 at a time; x
            // holds R rows of `cols` values.
            unsafe {
                let block = blocks.as_ptr().add(b * 34);
                let d = _mm256_broadcastss_ps(two_halves(block));
                let qs = block.add(2);
                let eight = |k: usize| {
                    let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(qs.add(8 * k).cast()));
                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(q))
                };
                let w = [eight(0), eight(1), eight(2), eight(3)];
                accumulate(&w, x.add(32 * b), cols, &mut even, &mut odd);
            }
        }
        // SAFETY: out holds R values.
        unsafe { store_sums(&even, &odd, out) };
    }
}

/// The AVX-512 kernels: as the AVX2 ones, a block's 32 weights in two 16-lane vectors.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    row_kernels!("avx512f,fma,f16c");

    /// The 32 weights of a Q4 block, unscaled: the low nibbles of its 16 bytes (elements 0..16)
    /// and the high nibbles (16..32).
    ///
    /// # Safety
    /// `qs` points at 16 readable bytes.
    #[target_feature(enable = "avx512f")]
    unsafe fn nibbles(qs: *const u8) -> [__m512; 2] {
        // SAFETY: the caller guarantees 16 readable bytes.
        let bytes = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(qs.cast()) });
        let low = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0f));
        [
            _mm512_cvtepi32_ps(low),
            _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)),
        ]
    }

    /// The f16 scale `d` and, for Q4_1, the f16 min `m` at the head of a block (without a min:
    /// −8d, Q4_0's; Q8_0 reads `d` alone).
    ///
    /// # Safety
    /// `block` points at 4 (Q4_1) or 2 readable bytes.
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn header(with_min: bool, block: *const u8) -> (f32, f32) {
        // SAFETY: the caller guarantees the header's bytes.
        let header = _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe {
            if with_min {
                block.cast::<i32>().read_unaligned()
            } else {
                block.cast::<u16>().read_unaligned() as i32
            }
        }));
        let d = _mm_cvtss_f32(header);
        let m = if with_min {
            _mm_cvtss_f32(_mm_movehdup_ps(header))
        } else {
            -8.0 * d
        };
        (d, m)
    }

    /// One weight row of `q4_rows` with one row of x, `Σ_b Σ_j w_bj x_bj`, each block's weights
    /// `w_bj = d_b·q_bj + m_b` looked up from a 16-entry table `T_b[k] = d_b·k + m_b` (one
    /// multiply-add) by their nibbles (`vpermps` reads an index's low 4 bits, so the low nibbles
    /// need no mask). That folds the scale and the min into the table: no integer-to-float
    /// conversions, no per-block scaling of the dot product and no `m_b · Σ x_b` term, so
    /// `x_sums` is not read — ≈ 12 instructions per 20-byte block against 15, and the kernel is
    /// bound by instructions rather than memory (docs/performance.md).
    ///
    /// # Safety
    /// As `q4_rows`, for one weight row and n = 1.
    #[target_feature(enable = "avx512f,fma,f16c")]
    unsafe fn q4_one(with_min: bool, blocks: &[u8], x: &[f32], _x_sums: &[f32]) -> f32 {
        let bb = if with_min { 20 } else { 18 };
        let nb = blocks.len() / bb;
        let k = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        let zero = [_mm512_setzero_ps(); 2];
        let [even, odd] = super::two_chains(nb, zero, |b, [low_acc, high_acc]| {
            // SAFETY: block b is `bb` readable bytes (checked by the caller), x holds `32 nb`
            // values.
            unsafe {
                let block = blocks.as_ptr().add(b * bb);
                prefetch_ahead(block);
                let (d, m) = header(with_min, block);
                let table = _mm512_fmadd_ps(k, _mm512_set1_ps(d), _mm512_set1_ps(m));
                let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(block.add(bb - 16).cast()));
                let low = _mm512_permutexvar_ps(bytes, table);
                let high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
                let xb = x.as_ptr().add(32 * b);
                [
                    _mm512_fmadd_ps(low, _mm512_loadu_ps(xb), low_acc),
                    _mm512_fmadd_ps(high, _mm512_loadu_ps(xb.add(16)), high_acc),
                ]
            }
        });
        let [a, b] = [
            _mm512_add_ps(even[0], odd[0]),
            _mm512_add_ps(even[1], odd[1]),
        ];
        _mm512_reduce_add_ps(_mm512_add_ps(a, b))
    }

    /// How far ahead of the block it multiplies a kernel asks for the weights: 8 KB. A step of
    /// a few rows reads every weight once, from memory, and the hardware prefetchers alone kept
    /// too few lines in flight on our 2-core Zen 5: with `prefetcht0` 8 KB ahead a one-row
    /// SmolLM2 step took ≈ 0.9× the time, steps of 3–16 rows ≈ 0.85× (512 B ahead: slower;
    /// docs/performance.md).
    const PREFETCH_BYTES: usize = 8192;

    /// Asks for the cache line [`PREFETCH_BYTES`] after `block` (past the end of the weights
    /// too: a prefetch reads nothing and never faults).
    #[inline(always)]
    fn prefetch_ahead(block: *const u8) {
        // SAFETY: `prefetcht0` only hints the caches; any address is allowed.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH_BYTES).cast()) }
    }

    /// One weight row of `q8_rows` with one row of x, `Σ_b d_b · (q_b · x_b)`: the dot product of the raw bytes, scaled.
    ///
    /// # Safety
    /// As `q8_rows`, for one weight row and n = 1.
    #[target_feature(enable = "avx512f,fma,f16c")]
    unsafe fn q8_one(blocks: &[u8], x: &[f32]) -> f32 {
        let nb = blocks.len() / 34;
        let [even, odd] = super::two_chains(nb, _mm512_setzero_ps(), |b, acc| {
            // SAFETY: block b is 34 readable bytes (checked by the caller): an f16 scale, then
            // 32 signed bytes read 16 at a time; x holds `32 nb` values.
            unsafe {
                let block = blocks.as_ptr().add(b * 34);
                prefetch_ahead(block);
                let (d, _) = header(false, block);
                let sixteen = |k: usize| {
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        block.add(2 + 16 * k).cast(),
                    )))
                };
                let xb = x.as_ptr().add(32 * b);
                let t = _mm512_mul_ps(sixteen(0), _mm512_loadu_ps(xb));
                let t = _mm512_fmadd_ps(sixteen(1), _mm512_loadu_ps(xb.add(16)), t);
                _mm512_fmadd_ps(_mm512_set1_ps(d), t, acc)
            }
        });
        _mm512_reduce_add_ps(_mm512_add_ps(even, odd))
    }

    /// Weight rows per tile: two, so that each vector of activations loaded from the cache serves
    /// both weight rows' multiply-adds. A fused multiply-add with a 64-byte load ran at one per
    /// cycle on our Zen 5 (two without the load), so a tile of one weight row was bound by its
    /// loads of `x` rather than by its arithmetic. Two weight rows with up to 8 rows of `x` keep
    /// their accumulators in 16 of the 32 vector registers (docs/performance.md).
    const WEIGHT_ROWS_PER_TILE: usize = 2;

    /// One or two ([`WEIGHT_ROWS_PER_TILE`]) weight rows of `q4_rows`, `row_bytes` each, with
    /// the `R` rows at `x`; the outputs at `out` for the first weight row, `out_stride` further
    /// for the second. Each block dequantised once, `w_j = d·q_j + m`, then multiplied with
    /// every row; each output sums in the same order as with one weight row per tile.
    ///
    /// # Safety
    /// As `q4_rows`, for the weight rows in `blocks`, R rows at `x` and `out` at them.
    #[target_feature(enable = "avx512f,fma,f16c")]
    unsafe fn q4_tile<const R: usize>(
        with_min: bool,
        blocks: &[u8],
        row_bytes: usize,
        x: *const f32,
        out: *mut f32,
        out_stride: usize,
    ) {
        let tile = if blocks.len() == 2 * row_bytes {
            q4_weight_rows::<R, 2>
        } else {
            q4_weight_rows::<R, 1>
        };
        // SAFETY: as this function's.
        unsafe { tile(with_min, blocks, row_bytes, x, out, out_stride) }
    }

    /// `q4_tile` for `W` weight rows.
    ///
    /// # Safety
    /// As `q4_tile`, with `W` weight rows in `blocks`.
    #[target_feature(enable = "avx512f,fma,f16c")]
    unsafe fn q4_weight_rows<const R: usize, const W: usize>(
        with_min: bool,
        blocks: &[u8],
        row_bytes: usize,
        x: *const f32,
        out: *mut f32,
        out_stride: usize,
    ) {
        let bb = if with_min { 20 } else { 18 };
        let nb = row_bytes / bb;
        let cols = 32 * nb;
        let mut even = [[_mm512_setzero_ps(); R]; W];
        let mut odd = [[_mm512_setzero_ps(); R]; W];
        for b in 0..nb {
            let mut w = [[_mm512_setzero_ps(); 2]; W];
            for (k, w) in w.iter_mut().enumerate() {
                // SAFETY: block b of weight row k is `bb` readable bytes (checked by the
                // caller).
                unsafe {
                    let block = blocks.as_ptr().add(k * row_bytes + b * bb);
                    prefetch_ahead(block);
                    let (d, m) = header(with_min, block);
                    let (d, m) = (_mm512_set1_ps(d), _mm512_set1_ps(m));
                    let [low, high] = nibbles(block.add(bb - 16));
                    *w = [_mm512_fmadd_ps(d, low, m), _mm512_fmadd_ps(d, high, m)];
                }
            }
            // SAFETY: x holds R rows of `cols` values.
            unsafe { accumulate(&w, x.add(32 * b), cols, &mut even, &mut odd) };
        }
        for k in 0..W {
            // SAFETY: out holds R values for each weight row, `out_stride` apart.
            unsafe { store_sums(&even[k], &odd[k], out.add(k * out_stride)) };
        }
    }

    /// Adds `w[k] · x[i, block]` for the `W` weight rows `k` and the `R` rows `i` of a tile (`x`
    /// the first row's values of the block, rows `cols` apart), each vector of `x` loaded once for
    /// all `W`. With at most 4 rows each pair has two accumulators (`even` for the block's first
    /// 16 weights, `odd` for the rest), so that a pair's chain of fused multiply-adds is one per
    /// block; with more, the chains overlap one another.
    ///
    /// # Safety
    /// `x` points at R rows of 32 readable f32, `cols` apart.
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn accumulate<const R: usize, const W: usize>(
        w: &[[__m512; 2]; W],
        x: *const f32,
        cols: usize,
        even: &mut [[__m512; R]; W],
        odd: &mut [[__m512; R]; W],
    ) {
        for i in 0..R {
            // SAFETY: the caller guarantees 32 readable values at each row.
            let (x0, x1) = unsafe {
                let x = x.add(i * cols);
                (_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)))
            };
            for k in 0..W {
                if R <= 4 {
                    even[k][i] = _mm512_fmadd_ps(w[k][0], x0, even[k][i]);
                    odd[k][i] = _mm512_fmadd_ps(w[k][1], x1, odd[k][i]);
                } else {
                    let t = _mm512_fmadd_ps(w[k][0], x0, even[k][i]);
                    even[k][i] = _mm512_fmadd_ps(w[k][1], x1, t);
                }
            }
        }
    }

    /// `out[i] = Σ lanes of even[i] + odd[i]`.
    ///
    /// # Safety
    /// `out` points at R writable f32.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_sums<const R: usize>(even: &[__m512; R], odd: &[__m512; R], out: *mut f32) {
        for i in 0..R {
            // SAFETY: the caller guarantees R values at `out`.
            unsafe { *out.add(i) = _mm512_reduce_add_ps(_mm512_add_ps(even[i], odd[i])) };
        }
    }

    /// As `q4_tile`, for Q8_0 blocks: each block dequantised once, `w_j = d·q_j`, then
    /// multiplied with every row.
    ///
    /// # Safety
    /// As `q8_rows`, for the weight rows in `blocks`, R rows at `x` and `out` at them.
    #[target_feature(enable = "avx512f,fma,f16c")]
    unsafe fn q8_tile<const R: usize>(
        blocks: &[u8],
        row_bytes: usize,
        x: *const f32,
        out: *mut f32,
        out_stride: usize,
    ) {
        let tile = if blocks.len() == 2 * row_bytes {
            q8_weight_rows::<R, 2>
        } else {
            q8_weight_rows::<R, 1>
        };
        // SAFETY: as this function's.
        unsafe { tile(blocks, row_bytes, x, out, out_stride) }
    }

    /// `q8_tile` for `W` weight rows.
    ///
    /// # Safety
    /// As `q8_tile`, with `W` weight rows in `blocks`.
    #[target_feature(enable = "avx512f,fma,f16c")]
    unsafe fn q8_weight_rows<const R: usize, const W: usize>(
        blocks: &[u8],
        row_bytes: usize,
        x: *const f32,
        out: *mut f32,
        out_stride: usize,
    ) {
        let nb = row_bytes / 34;
        let cols = 32 * nb;
        let mut even = [[_mm512_setzero_ps(); R]; W];
        let mut odd = [[_mm512_setzero_ps(); R]; W];
        for b in 0..nb {
            let mut w = [[_mm512_setzero_ps(); 2]; W];
            for (k, w) in w.iter_mut().enumerate() {
                // SAFETY: block b of weight row k is 34 readable bytes (checked by the caller):
                // an f16 scale, then 32 signed bytes read 16 at a time.
                unsafe {
                    let block = blocks.as_ptr().add(k * row_bytes + b * 34);
                    prefetch_ahead(block);
                    let d = _mm512_set1_ps(header(false, block).0);
                    for (h, w) in w.iter_mut().enumerate() {
                        let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(block.add(2 + 16 * h).cast()));
                        *w = _mm512_mul_ps(d, _mm512_cvtepi32_ps(q));
                    }
                }
            }
            // SAFETY: x holds R rows of `cols` values.
            unsafe { accumulate(&w, x.add(32 * b), cols, &mut even, &mut odd) };
        }
        for k in 0..W {
            // SAFETY: out holds R values for each weight row, `out_stride` apart.
            unsafe { store_sums(&even[k], &odd[k], out.add(k * out_stride)) };
        }
    }
}

/// `x W_kᵀ` for each of `blocks` when they apply — `x` has at most [`MAX_BLOCK_ROWS`] rows and
/// its backend has no autodiff ([`host_products_allowed`]) — else `None`. The activations go to
/// the host and back once for all `N`, which is where the CPU backends hold them anyway.
///
/// # Shapes
/// - x: `[batch, seq, cols]`; output k: `[batch, seq, rows_k]`
pub(crate) fn products_from_blocks<B: Backend, const N: usize>(
    blocks: Option<[&BlockMatrix; N]>,
    x: &Tensor<B, 3>,
) -> Option<[Tensor<B, 3>; N]> {
    let blocks = blocks?;
    let [batch, seq, _] = x.dims();
    if batch * seq > MAX_BLOCK_ROWS || !host_products_allowed::<B>(&x.device()) {
        return None;
    }
    let host: Vec<f32> = x.to_data().iter::<f32>().collect();
    let ys = matmul_rows_all(blocks, &host, batch * seq, Kernel::detect());
    let mut rows = blocks.map(BlockMatrix::rows).into_iter();
    Some(ys.map(|y| {
        let rows = rows.next().expect("one row count per matrix");
        Tensor::from_data(TensorData::new(y, [batch, seq, rows]), &x.device())
    }))
}

/// `linear_k(x)` for each of `linears`, from their GGUF blocks (in one pass) where
/// [`products_from_blocks`] applies.
///
/// Otherwise through `Linear::forward` on the `batch · seq` rows of `x` as one matrix: burn's
/// linear of a 3-D input multiplies batch by batch, and its weight gradient is then `batch`
/// products `xᵀ ∂y` of `seq` rows each, written out and summed, where the rows folded together
/// make it one product of `batch · seq` rows (docs/performance.md, fortieth session).
///
/// # Shapes
/// - x: `[batch, seq, d_in]`; output k: `[batch, seq, d_out_k]`
pub(crate) fn project_all<B: Backend, const N: usize>(
    linears: [&Linear<B>; N],
    blocks: Option<[&BlockMatrix; N]>,
    x: Tensor<B, 3>,
) -> [Tensor<B, 3>; N] {
    match products_from_blocks(blocks, &x) {
        Some(ys) => {
            let mut linears = linears.into_iter();
            ys.map(
                |y| match &linears.next().expect("one linear per product").bias {
                    Some(bias) => y + bias.val().unsqueeze::<3>(),
                    None => y,
                },
            )
        }
        None => {
            let [batch, seq, d_in] = x.dims();
            let rows = x.reshape([batch * seq, d_in]);
            linears.map(|l| {
                let y = l.forward(rows.clone());
                let [_, d_out] = y.dims();
                y.reshape([batch, seq, d_out])
            })
        }
    }
}

/// `linear(x)`, from its GGUF blocks where [`products_from_blocks`] applies.
///
/// # Shapes
/// - x: `[batch, seq, d_in]`; output: `[batch, seq, d_out]`
pub(crate) fn project<B: Backend>(
    linear: &Linear<B>,
    blocks: Option<&BlockMatrix>,
    x: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let [y] = project_all([linear], blocks.map(|b| [b]), x);
    y
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

/// Whether products may leave burn's graph for the host (the GGUF blocks' products and the host
/// steps): only on a backend without autodiff. On one with autodiff, any activation may carry a
/// gradient — an adapter's memory slots or embedding offset, computed from z, flowing through a
/// frozen model — and burn 0.21 cannot say which: `is_require_grad` is true only for a tensor
/// marked itself (`Requirement::Grad`), not for those computed from it, so a product on the host
/// would drop their gradients without an error.
pub(crate) fn host_products_allowed<B: Backend>(device: &B::Device) -> bool {
    !B::ad_enabled(device)
}

/// The GGUF names of a llama layer's attention matrices (q, k, v, o), as [`LayerBlocks`] holds
/// their blocks.
const ATTENTION_MATRICES: [&str; 4] = ["attn_q", "attn_k", "attn_v", "attn_output"];

/// The GGUF names of a llama layer's MLP matrices (gate, up, down).
const MLP_MATRICES: [&str; 3] = ["ffn_gate", "ffn_up", "ffn_down"];

/// The GGUF name of a llama model's output layer: the embedding when the two are tied.
fn output_matrix(config: &LlamaConfig) -> &'static str {
    if config.tie_embeddings {
        "token_embd.weight"
    } else {
        "output.weight"
    }
}

/// The GGUF names of the matrices [`llama_blocks`] found blocks for.
pub(crate) fn block_matrix_names(
    layers: &[LayerBlocks],
    output: Option<&BlockMatrix>,
    config: &LlamaConfig,
) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, layer) in layers.iter().enumerate() {
        let attention = layer.attention.as_ref().map(|_| ATTENTION_MATRICES);
        let mlp = layer.mlp.as_ref().map(|_| MLP_MATRICES);
        let parts = attention.iter().flatten().chain(mlp.iter().flatten());
        names.extend(parts.map(|part| format!("blk.{i}.{part}.weight")));
    }
    if output.is_some() {
        names.insert(output_matrix(config).to_string());
    }
    names
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
        let attention = all(&names(&ATTENTION_MATRICES))?
            .and_then(|v| <[BlockMatrix; 4]>::try_from(v).ok())
            .map(Arc::new);
        let mlp = all(&names(&MLP_MATRICES))?
            .and_then(|v| <[BlockMatrix; 3]>::try_from(v).ok())
            .map(Arc::new);
        layers.push(LayerBlocks { attention, mlp });
    }
    let output = gguf_blocks(gguf, output_matrix(config), heads)?;
    Ok((layers, output.map(Arc::new)))
}
