/// chorus: calls `f(start, end)` on consecutive ranges that cover `0..len`, spread over rayon's
/// threads when `len` is at least [`PAR_MIN_LEN`] (an element-wise pass over a large tensor on one
/// thread leaves the other cores idle); each range is [`PAR_CHUNK`] long but the last.
pub(crate) fn for_each_range(len: usize, f: impl Fn(usize, usize) + Sync + Send) {
    #[cfg(feature = "multi-threads")]
    if len >= PAR_MIN_LEN {
        use rayon::prelude::*;
        (0..len.div_ceil(PAR_CHUNK))
            .into_par_iter()
            .for_each(|c| f(c * PAR_CHUNK, ((c + 1) * PAR_CHUNK).min(len)));
        return;
    }
    f(0, len)
}

/// chorus: elements per range of [`for_each_range`] (128 KiB of f32).
pub(crate) const PAR_CHUNK: usize = 1 << 15;

/// chorus: the smallest length [`for_each_range`] splits over threads.
pub(crate) const PAR_MIN_LEN: usize = 1 << 17;

/// chorus: `f` applied to every element of `array`, in place when the array is uniquely owned;
/// standard-layout arrays of at least [`PAR_MIN_LEN`] elements are split over rayon's threads
/// ([`for_each_range`]), others go through ndarray's `mapv_into`.
pub(crate) fn map_elements<E: crate::NdArrayElement>(
    array: crate::SharedArray<E>,
    f: impl Fn(E) -> E + Sync + Send,
) -> crate::SharedArray<E> {
    if array.len() < PAR_MIN_LEN || !array.is_standard_layout() {
        return array.mapv_into(f).into_shared();
    }
    let mut out = if array.is_unique() {
        array.into_owned()
    } else {
        // A shared input is read where it is; each range writes its own part of `out`.
        let mut out = ndarray::ArrayD::<E>::zeros(array.raw_dim());
        let (input, target) = (
            array.as_slice().expect("standard layout"),
            out.as_slice_mut().unwrap(),
        );
        let (i, o) = (input.as_ptr() as usize, target.as_mut_ptr() as usize);
        for_each_range(input.len(), |start, end| {
            // SAFETY: `start..end` lies in both slices; the ranges are disjoint.
            let (input, target) = unsafe {
                (
                    core::slice::from_raw_parts((i as *const E).add(start), end - start),
                    core::slice::from_raw_parts_mut((o as *mut E).add(start), end - start),
                )
            };
            for (y, x) in target.iter_mut().zip(input) {
                *y = f(*x);
            }
        });
        return out.into_shared();
    };
    let target = out.as_slice_mut().expect("standard layout");
    let at = target.as_mut_ptr() as usize;
    for_each_range(target.len(), |start, end| {
        // SAFETY: `start..end` lies in the slice; the ranges are disjoint.
        let range =
            unsafe { core::slice::from_raw_parts_mut((at as *mut E).add(start), end - start) };
        for x in range {
            *x = f(*x);
        }
    });
    out.into_shared()
}

/// Macro for running a function in parallel.
#[cfg(feature = "multi-threads")]
#[macro_export(local_inner_macros)]
macro_rules! run_par {
    (
        $func:expr
    ) => {{
        use rayon::prelude::*;

        #[allow(clippy::redundant_closure_call)]
        rayon::scope(|_| $func())
    }};
}

/// Macro for running a function in parallel.
#[cfg(not(feature = "multi-threads"))]
#[macro_export(local_inner_macros)]
macro_rules! run_par {
    (
        $func:expr
    ) => {{ $func() }};
}

/// Macro for iterating in parallel.
#[cfg(not(feature = "multi-threads"))]
#[macro_export(local_inner_macros)]
macro_rules! iter_par {
    (
        $iter:expr
    ) => {{ $iter }};
}

/// Macro for iterating in parallel.
#[cfg(feature = "multi-threads")]
#[macro_export(local_inner_macros)]
macro_rules! iter_par {
    (
        $iter:expr
    ) => {{ $iter.into_par_iter() }};
}

/// Macro for iterating in parallel.
#[cfg(feature = "multi-threads")]
#[macro_export(local_inner_macros)]
macro_rules! iter_slice_par {
    (
        $slice:expr
    ) => {{ $slice.into_par_iter() }};
}

/// Macro for iterating in parallel.
#[cfg(not(feature = "multi-threads"))]
#[macro_export(local_inner_macros)]
macro_rules! iter_slice_par {
    (
        $slice:expr
    ) => {{ $slice.iter() }};
}

/// Macro for iterating over a range in parallel.
#[cfg(feature = "multi-threads")]
#[macro_export(local_inner_macros)]
macro_rules! iter_range_par {
    (
        $start:expr, $end:expr
    ) => {{ ($start..$end).into_par_iter() }};
}

/// Macro for iterating over a range in parallel.
#[cfg(not(feature = "multi-threads"))]
#[macro_export(local_inner_macros)]
macro_rules! iter_range_par {
    (
        $start:expr, $end:expr
    ) => {{ ($start..$end) }};
}
