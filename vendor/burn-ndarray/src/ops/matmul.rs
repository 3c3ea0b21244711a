use crate::UnsafeSharedRef;
use crate::{NdArrayElement, ShapeOps, SharedArray, iter_range_par, ops::NdArrayOps, run_par};

use alloc::{vec, vec::Vec};
use burn_backend::ElementConversion;
use burn_backend::Shape;
use ndarray::{IxDyn, s};

pub(crate) fn matmul<E: NdArrayElement>(
    lhs: SharedArray<E>,
    rhs: SharedArray<E>,
) -> SharedArray<E> {
    let shape_lhs = lhs.shape();
    let shape_rhs = rhs.shape();
    let ndims = shape_lhs.num_dims();
    let m = shape_lhs[ndims - 2]; // # of left rows
    let k = shape_rhs[ndims - 2]; // # of left cols and right rows
    let n = shape_rhs[ndims - 1]; // # of right cols

    let (out_shape, strides_lhs, strides_rhs, strides_out) = output_shape(shape_lhs, shape_rhs);
    let l_mat_size = m * k; // size of matrix component of left array
    let r_mat_size = k * n; // size of matrix component of right array
    let out_mat_size = m * n; // size of matrix component of output array

    let num_l_batches = shape_lhs.num_elements() / l_mat_size;
    let num_r_batches = shape_rhs.num_elements() / r_mat_size;
    let num_out_batches = out_shape.num_elements() / out_mat_size;

    // chorus: a few rows in all against one right-hand matrix (decoding: every `Linear`, and a
    // tied output layer's transposed embedding): multiply the operands' own views, so a
    // transposed matrix is neither copied by a reshape nor packed.
    if num_r_batches == 1 && num_l_batches * m <= SMALL_M_ROWS && lhs.is_standard_layout() {
        let rows = num_l_batches * m;
        let mut rhs_view = rhs.view();
        while rhs_view.ndim() > 2 {
            rhs_view = rhs_view.index_axis_move(ndarray::Axis(0), 0);
        }
        let rhs_view = rhs_view
            .into_dimensionality::<ndarray::Ix2>()
            .expect("two axes left");
        let lhs_view = lhs
            .view()
            .into_shape_with_order((rows, k))
            .expect("standard layout");
        let mut out = ndarray::Array2::<E>::zeros((rows, n));
        if small_m_matmul(&lhs_view, &rhs_view, &mut out.view_mut()) {
            return NdArrayOps::reshape(out.into_shared().into_dyn(), out_shape);
        }
    }

    // chorus: one right-hand matrix in another layout than row-major (a tied output layer's
    // transposed embedding `Eᵀ`) against many rows: one GEMM on the operands' own views, the
    // kernel reading `rhs` through its strides, where the reshapes below would copy all of it.
    if num_r_batches == 1
        && num_out_batches == num_l_batches
        && lhs.is_standard_layout()
        && !rhs.is_standard_layout()
    {
        let rows = num_l_batches * m;
        let mut rhs_view = rhs.view();
        while rhs_view.ndim() > 2 {
            rhs_view = rhs_view.index_axis_move(ndarray::Axis(0), 0);
        }
        let rhs_view = rhs_view
            .into_dimensionality::<ndarray::Ix2>()
            .expect("two axes left");
        let lhs_view = lhs
            .view()
            .into_shape_with_order((rows, k))
            .expect("standard layout");
        let mut out = ndarray::Array2::<E>::zeros((rows, n));
        gemm_into(&lhs_view, &rhs_view, &mut out.view_mut(), max_threads());
        return NdArrayOps::reshape(out.into_shared().into_dyn(), out_shape);
    }

    // chorus: one right-hand matrix shared by every left batch (every `Linear`, whose weight is
    // broadcast as [1, .., 1, k, n]): fold the left batches into rows, so the weight is packed
    // once for one large GEMM instead of once per batch. Exact: each output element is the same
    // dot product, accumulated in the same order by the same kernel.
    if num_r_batches == 1
        && num_l_batches > 1
        && num_out_batches == num_l_batches
        && lhs.is_standard_layout()
    {
        let rows = num_l_batches * m;
        let lhs = NdArrayOps::reshape(lhs, Shape::new([1, rows, k]));
        let rhs = NdArrayOps::reshape(rhs, Shape::new([1, k, n]));
        return NdArrayOps::reshape(matmul(lhs, rhs), out_shape);
    }

    // chorus: batches folded into one axis as views of the operands where their strides allow
    // (`to_shape`: a key cache's narrowed, transposed view, say), copied only where they do not;
    // the kernels read each batch's matrix through its strides.
    let lhs_array = lhs
        .to_shape((num_l_batches, m, k))
        .expect("the left operand holds num_l_batches m × k matrices");
    let rhs_array = rhs
        .to_shape((num_r_batches, k, n))
        .expect("the right operand holds num_r_batches k × n matrices");

    // chorus: one batch gets every thread inside the GEMM; several share them out by batch.
    let gemm_threads = if num_out_batches == 1 { max_threads() } else { 1 };

    let out = run_par!(|| {
        let mut out_array = ndarray::Array3::<E>::zeros((num_out_batches, m, n));
        let unsafe_shared_out_array = UnsafeSharedRef::new(&mut out_array);

        iter_range_par!(0, num_out_batches).for_each(|out_batch| {
            // Here, we:
            //   1. Un-flatten the output batch into a component-based batch index.
            //   2. Use the strides for left and right batch indices to convert it to a flattened
            //      batch for left and right.
            let out_index = strides_out.unflatten(out_batch);
            let l_batch = strides_lhs.flatten(&out_index);
            let r_batch = strides_rhs.flatten(&out_index);

            let lhs_slice = lhs_array.slice(s!(l_batch, .., ..));
            let rhs_slice = rhs_array.slice(s!(r_batch, .., ..));

            unsafe {
                let mut out_slice = unsafe_shared_out_array
                    .get()
                    .slice_mut(s!(out_batch, .., ..));

                // chorus: a few rows (decoding) read the right-hand matrix once, without the
                // GEMM's packing of all of it.
                if m <= SMALL_M_ROWS && small_m_matmul(&lhs_slice, &rhs_slice, &mut out_slice) {
                    return;
                }
                gemm_into(&lhs_slice, &rhs_slice, &mut out_slice, gemm_threads);
            }
        });

        out_array.into_shared().into_dyn()
    });

    NdArrayOps::reshape(out, out_shape)
}

/// chorus: the threads a GEMM may use (rayon's pool under `multi-threads`, else one).
fn max_threads() -> usize {
    #[cfg(feature = "multi-threads")]
    {
        rayon::current_num_threads()
    }
    #[cfg(not(feature = "multi-threads"))]
    {
        1
    }
}

/// chorus: `out = lhs · rhs` — through the `gemm` crate for f32 and f64 (its AVX-512 kernels where
/// the CPU has them, each operand read through its own strides, so a transposed view is neither
/// copied nor slower), through ndarray's `general_mat_mul` (matrixmultiply, AVX2 at most) for the
/// other element types. `threads > 1` lets the `gemm` crate split a product of ≥ 2¹⁸ multiply-adds
/// over that many of rayon's threads.
///
/// # Shapes
/// - lhs `[m, k]`, rhs `[k, n]`, out `[m, n]`
fn gemm_into<E: NdArrayElement>(
    lhs: &ndarray::ArrayView2<'_, E>,
    rhs: &ndarray::ArrayView2<'_, E>,
    out: &mut ndarray::ArrayViewMut2<'_, E>,
    threads: usize,
) {
    use core::any::TypeId;
    let is = |t: TypeId| TypeId::of::<E>() == t;
    if !(is(TypeId::of::<f32>()) || is(TypeId::of::<f64>())) {
        ndarray::linalg::general_mat_mul(1.0.elem(), lhs, rhs, 0.0.elem(), out);
        return;
    }
    let ((m, k), n) = (lhs.dim(), rhs.dim().1);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0.elem());
        return;
    }
    let parallelism = match threads {
        #[cfg(feature = "multi-threads")]
        t if t > 1 && m * n * k >= 1 << 18 => gemm::Parallelism::Rayon(t),
        _ => gemm::Parallelism::None,
    };
    let (ls, rs, os) = (lhs.strides(), rhs.strides(), out.strides());
    let (os0, os1) = (os[0], os[1]);
    // SAFETY: the three views are valid for their dims and strides, `out` does not alias the
    // operands (it is borrowed mutably), and `gemm` reads only m·k, k·n elements through the
    // strides it is given and writes only m·n. `read_dst = false`: out = 1·(lhs · rhs).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            os1,
            os0,
            false,
            lhs.as_ptr(),
            ls[1],
            ls[0],
            rhs.as_ptr(),
            rs[1],
            rs[0],
            0.0.elem::<E>(),
            1.0.elem::<E>(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// chorus: left operands with at most this many rows go through [`small_m_matmul`].
const SMALL_M_ROWS: usize = 8;

/// chorus: `out = lhs · rhs` for a left operand of a few rows, reading `rhs` once in its own
/// layout — row-major (`out[i, :] += lhs[i, p] · rhs[p, :]`, contiguous row updates) or
/// column-major, e.g. a transposed weight (`out[i, j] = ⟨lhs[i, :], rhs[:, j]⟩`, contiguous dot
/// products) — in column blocks spread over threads. Returns false, leaving `out` alone, for any
/// other layout. Each element is summed in a fixed order, whatever the thread count.
///
/// # Shapes
/// - lhs `[m, k]`, rhs `[k, n]`, out `[m, n]`, m ≤ [`SMALL_M_ROWS`]
fn small_m_matmul<E: NdArrayElement>(
    lhs: &ndarray::ArrayView2<'_, E>,
    rhs: &ndarray::ArrayView2<'_, E>,
    out: &mut ndarray::ArrayViewMut2<'_, E>,
) -> bool {
    let (m, k) = lhs.dim();
    let n = rhs.dim().1;
    let rhs_strides = rhs.strides();
    let row_major = rhs_strides[1] == 1 && rhs_strides[0] == n as isize;
    let col_major = rhs_strides[0] == 1 && rhs_strides[1] == k as isize;
    let (Some(rhs_data), true) = (rhs.as_slice_memory_order(), row_major || col_major) else {
        return false;
    };
    if k == 0 || n == 0 {
        return false;
    }
    let lhs_rows: Vec<Vec<E>> = (0..m).map(|i| lhs.row(i).to_vec()).collect();
    // Columns per block: ≈ 64k weights each, a multiple of 16.
    let block = ((1usize << 16) / k).clamp(16, n.max(16)).next_multiple_of(16);
    // Block-major result: block b holds rows 0..m of columns b·block.., `width` wide.
    let mut result = vec![E::zero(); m * n];
    let avx2 = has_avx2();
    let f32_avx = is_f32_with_avx::<E>();
    let work = |(b, chunk): (usize, &mut [E])| {
        let block = Block {
            lhs_rows: &lhs_rows,
            rhs: rhs_data,
            row_major,
            f32_avx,
            n,
            k,
            start: b * block,
        };
        #[cfg(all(target_arch = "x86_64", feature = "std"))]
        if avx2 {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time).
            unsafe { block.run_avx2(chunk) };
            return;
        }
        let _ = avx2;
        block.run(chunk);
    };
    #[cfg(feature = "multi-threads")]
    {
        use rayon::prelude::*;
        if m * k * n >= 1 << 15 {
            result
                .par_chunks_mut(m * block)
                .enumerate()
                .for_each(work);
        } else {
            result.chunks_mut(m * block).enumerate().for_each(work);
        }
    }
    #[cfg(not(feature = "multi-threads"))]
    result.chunks_mut(m * block).enumerate().for_each(work);
    for (b, chunk) in result.chunks(m * block).enumerate() {
        let width = chunk.len() / m;
        for (i, row) in chunk.chunks_exact(width).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                out[(i, b * block + c)] = v;
            }
        }
    }
    true
}

/// chorus: whether [`Block::run_avx2`] may run.
fn has_avx2() -> bool {
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(all(target_arch = "x86_64", feature = "std")))]
    false
}

/// chorus: whether `E` is f32 and the CPU has AVX, so [`Block::dot`] may run [`dot_f32_avx`].
fn is_f32_with_avx<E: NdArrayElement>() -> bool {
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    {
        core::any::TypeId::of::<E>() == core::any::TypeId::of::<f32>()
            && std::is_x86_feature_detected!("avx")
    }
    #[cfg(not(all(target_arch = "x86_64", feature = "std")))]
    false
}

/// chorus: one column block of [`small_m_matmul`].
struct Block<'a, E> {
    lhs_rows: &'a [Vec<E>],
    rhs: &'a [E],
    row_major: bool,
    /// [`is_f32_with_avx`], asked once per product rather than per dot product.
    f32_avx: bool,
    n: usize,
    k: usize,
    start: usize,
}

impl<E: NdArrayElement> Block<'_, E> {
    /// Fills `chunk` (rows 0..m of this block's columns, row after row).
    #[inline(always)]
    fn run(&self, chunk: &mut [E]) {
        let (n, k, start) = (self.n, self.k, self.start);
        let m = self.lhs_rows.len();
        let width = chunk.len() / m;
        if self.row_major {
            for (x, y) in self.lhs_rows.iter().zip(chunk.chunks_exact_mut(width)) {
                for (p, &a) in x.iter().enumerate() {
                    let w = &self.rhs[p * n + start..p * n + start + width];
                    for (y, &w) in y.iter_mut().zip(w) {
                        *y = *y + a * w;
                    }
                }
            }
        } else {
            // chorus: column by column, every row against it while it is in the L1 cache (rows
            // outside, each row read the block's columns again from L2).
            for (c, w) in self.rhs[start * k..(start + width) * k]
                .chunks_exact(k)
                .enumerate()
            {
                for (i, x) in self.lhs_rows.iter().enumerate() {
                    chunk[i * width + c] = self.dot(x, w);
                }
            }
        }
    }

    /// [`Block::run`] compiled for AVX2 (8 lanes instead of SSE2's 4; same order of sums).
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, chunk: &mut [E]) {
        self.run(chunk)
    }

    /// chorus: [`dot`], in one AVX2 vector of its 8 sums for f32 inside [`Block::run_avx2`]
    /// (compiled from `dot` itself they stayed 8 scalar chains, ≈ 1 multiply-add a cycle): each
    /// lane multiplies, rounds, then adds, as the scalar code does, and the lanes are summed in
    /// the same order, so the result is the same to the bit.
    #[inline(always)]
    fn dot(&self, x: &[E], w: &[E]) -> E {
        #[cfg(all(target_arch = "x86_64", feature = "std"))]
        if self.f32_avx {
            // SAFETY: E is f32 and the CPU has AVX (`is_f32_with_avx`), so the slices are slices
            // of f32.
            let sum = unsafe {
                dot_f32_avx(
                    core::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()),
                    core::slice::from_raw_parts(w.as_ptr().cast::<f32>(), w.len()),
                )
            };
            return sum.elem();
        }
        dot(x, w)
    }
}

/// chorus: [`dot`] for f32 in one 8-lane vector: lane `l` sums `x[8c + l] · w[8c + l]` over the
/// chunks `c` (multiply, round, add, round, as the scalar code), then `0 + s_0 + … + s_7` and the
/// remainder's sum, in `dot`'s order.
#[cfg(all(target_arch = "x86_64", feature = "std"))]
#[target_feature(enable = "avx")]
unsafe fn dot_f32_avx(x: &[f32], w: &[f32]) -> f32 {
    use core::arch::x86_64::*;
    let n = x.len().min(w.len());
    let chunks = n / 8;
    let mut acc = _mm256_setzero_ps();
    for c in 0..chunks {
        // SAFETY: 8c + 8 ≤ n ≤ both lengths.
        let (xv, wv) = unsafe {
            (
                _mm256_loadu_ps(x.as_ptr().add(8 * c)),
                _mm256_loadu_ps(w.as_ptr().add(8 * c)),
            )
        };
        acc = _mm256_add_ps(acc, _mm256_mul_ps(xv, wv));
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let mut rest = 0.0f32;
    for (&x, &w) in x[8 * chunks..n].iter().zip(&w[8 * chunks..n]) {
        rest += x * w;
    }
    lanes.iter().fold(0.0f32, |s, &a| s + a) + rest
}

/// chorus: `⟨x, w⟩` with 8 independent partial sums (vectorisable without reassociation flags).
#[inline(always)]
fn dot<E: NdArrayElement>(x: &[E], w: &[E]) -> E {
    let mut acc = [E::zero(); 8];
    let (xc, wc) = (x.chunks_exact(8), w.chunks_exact(8));
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (x, w) in xc.zip(wc) {
        for l in 0..8 {
            acc[l] = acc[l] + x[l] * w[l];
        }
    }
    let mut sum = E::zero();
    for (&x, &w) in xr.iter().zip(wr) {
        sum = sum + x * w;
    }
    acc.iter().fold(E::zero(), |s, &a| s + a) + sum
}

#[derive(Debug, PartialEq)]
struct Strides {
    strides: Vec<usize>,
}
impl Strides {
    fn new(strides: Vec<usize>) -> Self {
        Strides { strides }
    }

    fn unflatten(&self, linear_index: usize) -> Vec<usize> {
        let mut coord = Vec::with_capacity(self.strides.len());
        let mut rem = linear_index;
        for stride in self.strides.iter() {
            coord.push(rem / stride);
            rem %= stride;
        }
        coord
    }

    fn flatten(&self, index: &Vec<usize>) -> usize {
        assert_eq!(self.strides.len(), index.len());
        self.strides
            .iter()
            .zip(index)
            .map(|(stride, index)| stride * index)
            .sum()
    }
}

/// Compute the (broadcasted) output shape of matrix multiplication, along with strides for
/// the non-matrix dimensions of all arrays.
///
/// # Arguments
/// * `lsh`: Shape of the first (left-hand) matrix multiplication argument.
/// * `rsh`: Shape of the second (right-hand) matrix multiplication argument.
///
/// # Panics
/// * If `D` is not at least 2.
/// * If the matrix multiplication dimensions (last 2) are incompatible.
/// * If any other dimension is not the same for both tensors, or equal to 1. (Any dimension where
///   one dim is equal to 1 is broadcast.)
fn output_shape(lsh: &[usize], rsh: &[usize]) -> (Shape, Strides, Strides, Strides) {
    let ndims = lsh.num_dims();
    if ndims < 2 {
        panic!("Matrix multiplication requires an array with at least 2 dimensions.");
    }

    // Fetch matrix dimensions and check compatibility.
    let l_rows = lsh[ndims - 2];
    let l_cols = lsh[ndims - 1];
    let r_rows = rsh[ndims - 2];
    let r_cols = rsh[ndims - 1];
    if l_cols != r_rows {
        panic!("Dimensions are incompatible for matrix multiplication.");
    }
    // Set matrix dimensions of the output shape.
    let mut osh = vec![0; ndims];
    osh[ndims - 2] = l_rows;
    osh[ndims - 1] = r_cols;

    // Set other array dimensions, broadcasting as necessary.
    // Compute the strides inline.
    let mut cur_l_stride: usize = 1;
    let mut cur_r_stride: usize = 1;
    let mut cur_o_stride: usize = 1;
    let mut l_strides = Vec::with_capacity(ndims - 2);
    let mut r_strides = Vec::with_capacity(ndims - 2);
    let mut o_strides = Vec::with_capacity(ndims - 2);
    for i in (0..ndims - 2).rev() {
        let l_dim = lsh[i];
        let r_dim = rsh[i];

        // Compatible dimensions are:
        //   1. Both dimensions are equal.
        //   2. One of the dimensions is equal to 1.
        let o_dim: usize;
        if l_dim == r_dim {
            o_dim = l_dim; // both dimensions are equal
            l_strides.push(cur_l_stride);
            r_strides.push(cur_r_stride);
        } else if l_dim == 1 {
            o_dim = r_dim; // broadcast the left
            l_strides.push(0);
            r_strides.push(cur_r_stride);
        } else if r_dim == 1 {
            o_dim = l_dim; // broadcast the right
            l_strides.push(cur_l_stride);
            r_strides.push(0);
        } else {
            panic!("Dimensions differ and cannot be broadcasted.");
        }
        osh[i] = o_dim;
        o_strides.push(cur_o_stride);
        cur_o_stride *= o_dim;

        cur_l_stride *= l_dim;
        cur_r_stride *= r_dim;
    }
    l_strides.reverse();
    r_strides.reverse();
    o_strides.reverse();

    (
        Shape::from(osh),
        Strides::new(l_strides),
        Strides::new(r_strides),
        Strides::new(o_strides),
    )
}

pub(crate) fn cross<E: NdArrayElement>(
    lhs: SharedArray<E>,
    rhs: SharedArray<E>,
    dim: usize,
) -> SharedArray<E> {
    let shape_lhs = lhs.shape();
    let shape_rhs = rhs.shape();
    let ndims = shape_lhs.num_dims();

    // Broadcast the shapes except along dim
    let mut broadcast_shape = vec![0; ndims];
    for i in 0..ndims {
        if i == dim {
            broadcast_shape[i] = shape_lhs[i]; // already checked to be 3
        } else {
            let l = shape_lhs[i];
            let r = shape_rhs[i];
            if l == r {
                broadcast_shape[i] = l;
            } else if l == 1 {
                broadcast_shape[i] = r;
            } else if r == 1 {
                broadcast_shape[i] = l;
            } else {
                panic!("Tensors are not broadcastable along dimension {}", i);
            }
        }
    }

    // Broadcast lhs and rhs
    let lhs_broadcast = if shape_lhs == broadcast_shape.as_slice() {
        lhs
    } else {
        NdArrayOps::expand(lhs, Shape::from(broadcast_shape.clone()))
    };
    let rhs_broadcast = if shape_rhs == broadcast_shape.as_slice() {
        rhs
    } else {
        NdArrayOps::expand(rhs, Shape::from(broadcast_shape.clone()))
    };

    // Now, move dim to the last dimension
    let mut perm = (0..ndims).collect::<Vec<_>>();
    perm.remove(dim);
    perm.push(dim);

    let lhs_permuted = NdArrayOps::permute(lhs_broadcast, &perm);
    let rhs_permuted = NdArrayOps::permute(rhs_broadcast, &perm);

    // Reshape to (*, 3)
    let total_elements = lhs_permuted.shape().num_elements();
    let batch_size = total_elements / 3;
    let lhs_reshaped = NdArrayOps::reshape(lhs_permuted, Shape::new([batch_size, 3]));
    let rhs_reshaped = NdArrayOps::reshape(rhs_permuted, Shape::new([batch_size, 3]));

    // Compute cross product
    let mut result = ndarray::ArrayD::<E>::zeros(IxDyn(&[batch_size, 3]));
    for i in 0..batch_size {
        let a1 = lhs_reshaped[IxDyn(&[i, 0])];
        let a2 = lhs_reshaped[IxDyn(&[i, 1])];
        let a3 = lhs_reshaped[IxDyn(&[i, 2])];
        let b1 = rhs_reshaped[IxDyn(&[i, 0])];
        let b2 = rhs_reshaped[IxDyn(&[i, 1])];
        let b3 = rhs_reshaped[IxDyn(&[i, 2])];
        result[IxDyn(&[i, 0])] = a2.mul(b3).sub(a3.mul(b2));
        result[IxDyn(&[i, 1])] = a3.mul(b1).sub(a1.mul(b3));
        result[IxDyn(&[i, 2])] = a1.mul(b2).sub(a2.mul(b1));
    }

    let result_shared = result.into_shared();

    // Reshape back to the broadcast shape with dim at the end
    let mut result_shape = broadcast_shape;
    result_shape.remove(dim);
    result_shape.push(3);
    let result_reshaped = NdArrayOps::reshape(result_shared, Shape::from(result_shape));

    // Permute back
    let mut inv_perm = vec![0; ndims];
    for (i, &p) in perm.iter().enumerate() {
        inv_perm[p] = i;
    }
    NdArrayOps::permute(result_reshaped, &inv_perm)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Strides {
        fn empty() -> Self {
            Strides {
                strides: Vec::with_capacity(0),
            }
        }
    }

    #[test]
    fn test_output_shape() {
        // plain matrix multiply
        assert_eq!(
            output_shape(&[5, 3], &[3, 7]),
            (
                Shape::from([5, 7]),
                Strides::empty(),
                Strides::empty(),
                Strides::empty()
            )
        );
        // matrix multiply with one extra stack dimension
        assert_eq!(
            output_shape(&[4, 5, 3], &[4, 3, 7]),
            (
                Shape::from([4, 5, 7]),
                Strides::new(vec![1]),
                Strides::new(vec![1]),
                Strides::new(vec![1])
            )
        );
        // rank 3, broadcast left
        assert_eq!(
            output_shape(&[1, 5, 3], &[4, 3, 7]),
            (
                Shape::from([4, 5, 7]),
                Strides::new(vec![0]),
                Strides::new(vec![1]),
                Strides::new(vec![1])
            )
        );
        // rank 3, broadcast right
        assert_eq!(
            output_shape(&[4, 5, 3], &[1, 3, 7]),
            (
                Shape::from([4, 5, 7]),
                Strides::new(vec![1]),
                Strides::new(vec![0]),
                Strides::new(vec![1])
            )
        );
        // rank 4, multi broadcast
        assert_eq!(
            output_shape(&[1, 4, 5, 3], &[8, 1, 3, 7]),
            (
                Shape::from([8, 4, 5, 7]),
                Strides::new(vec![0, 1]),
                Strides::new(vec![1, 0]),
                Strides::new(vec![4, 1])
            )
        );
        // rank 5, multi-broadcast
        assert_eq!(
            output_shape(&[1, 3, 4, 5, 3], &[8, 3, 1, 3, 7]),
            (
                Shape::from([8, 3, 4, 5, 7]),
                Strides::new(vec![0, 4, 1]),
                Strides::new(vec![3, 1, 0]),
                Strides::new(vec![12, 4, 1])
            )
        )
    }

    #[test]
    #[should_panic(
        expected = "Matrix multiplication requires an array with at least 2 dimensions."
    )]
    fn test_output_shape_too_small() {
        output_shape(&[4], &[4]);
    }

    #[test]
    #[should_panic(expected = "Dimensions are incompatible for matrix multiplication.")]
    fn test_output_shape_bad_matrix_dims() {
        output_shape(&[5, 3], &[4, 7]);
    }

    #[test]
    #[should_panic(expected = "Dimensions differ and cannot be broadcasted.")]
    fn test_output_shape_non_broadcast() {
        output_shape(&[4, 5, 3], &[2, 3, 7]);
    }
}
