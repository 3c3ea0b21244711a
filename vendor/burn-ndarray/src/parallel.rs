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

/// chorus: a slice handed to [`for_each_range`]'s threads by address (a raw pointer is not
/// `Send`), from which each range takes its own part.
pub(crate) struct RangeSource<T> {
    at: usize,
    len: usize,
    element: core::marker::PhantomData<fn() -> T>,
}

impl<T> Clone for RangeSource<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for RangeSource<T> {}

impl<T> RangeSource<T> {
    pub(crate) fn new(slice: &[T]) -> Self {
        Self {
            at: slice.as_ptr() as usize,
            len: slice.len(),
            element: core::marker::PhantomData,
        }
    }

    pub(crate) fn new_mut(slice: &mut [T]) -> Self {
        Self {
            at: slice.as_mut_ptr() as usize,
            len: slice.len(),
            element: core::marker::PhantomData,
        }
    }

    /// Elements `start..end` (checked against the slice's length).
    ///
    /// # Safety
    /// The slice outlives the range, and nothing writes to these elements meanwhile except
    /// element for element through an aliasing [`RangeSource::range_mut`] of the same range.
    pub(crate) unsafe fn range<'a>(self, start: usize, end: usize) -> &'a [T] {
        assert!(start <= end && end <= self.len, "range {start}..{end} of {}", self.len);
        // SAFETY: in bounds (checked above); the caller guarantees the rest.
        unsafe { core::slice::from_raw_parts((self.at as *const T).add(start), end - start) }
    }

    /// Elements `start..end`, to write (checked against the slice's length).
    ///
    /// # Safety
    /// The slice came from [`RangeSource::new_mut`] and outlives the range, and the ranges that
    /// threads write are disjoint.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn range_mut<'a>(self, start: usize, end: usize) -> &'a mut [T] {
        assert!(start <= end && end <= self.len, "range {start}..{end} of {}", self.len);
        // SAFETY: in bounds (checked above); the caller guarantees the rest.
        unsafe { core::slice::from_raw_parts_mut((self.at as *mut T).add(start), end - start) }
    }
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
        let input = RangeSource::new(array.as_slice().expect("standard layout"));
        let target = RangeSource::new_mut(out.as_slice_mut().expect("standard layout"));
        for_each_range(array.len(), |start, end| {
            // SAFETY: both buffers outlive the loop; the ranges are disjoint.
            let (input, target) = unsafe { (input.range(start, end), target.range_mut(start, end)) };
            for (y, x) in target.iter_mut().zip(input) {
                *y = f(*x);
            }
        });
        return out.into_shared();
    };
    let target = RangeSource::new_mut(out.as_slice_mut().expect("standard layout"));
    for_each_range(out.len(), |start, end| {
        // SAFETY: `out` outlives the loop; the ranges are disjoint.
        for x in unsafe { target.range_mut(start, end) } {
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
