//! Weight bytes in memory that Linux may back with 2 MiB pages.
//!
//! A decoding step reads every block of the model once: SmolLM2-135M's ≈ 97 MB are ≈ 24,000 pages
//! of 4 KiB, far more than a core's TLB holds, so each page's first read in a step walks the page
//! tables, and a second model decoding beside it (a lazy assistant's catch-ups) doubles the page
//! tables' share of the caches. In 2 MiB pages the same bytes are 49 entries. [`HugePageBytes`]
//! hands out immutable byte ranges of chunks of at least [`CHUNK`] bytes, mapped at 2 MiB
//! boundaries and advised with `madvise(MADV_HUGEPAGE)`, so that the kernel backs them with huge
//! pages wherever transparent huge pages are `always` or `madvise` (Debian's default; with
//! `never`, or outside Linux, they are ordinary pages and nothing else changes). A chunk is shared
//! by the ranges cut from it and unmapped when the last of them is dropped.
//!
//! Measured in docs/performance.md ("Decoding weights in 2 MiB pages").

use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// The huge page size of x86-64 and of aarch64 with 4 KiB base pages.
const HUGE_PAGE: usize = 2 << 20;

/// Bytes of a chunk that ranges share; a range of at least half of it gets a chunk of its own.
const CHUNK: usize = 16 * HUGE_PAGE;

/// Where each range starts within its chunk: a cache line.
const RANGE_ALIGN: usize = 64;

/// One mapping (or, where no mapping is made, one allocation) of `len` bytes at a 2 MiB boundary.
struct Chunk {
    ptr: NonNull<u8>,
    len: usize,
    mapped: bool,
}

// SAFETY: a chunk is plain memory; the ranges cut from it are disjoint, written once before they
// are shared, and read-only after ([`HugePageBytes::new`]).
unsafe impl Send for Chunk {}
// SAFETY: as above.
unsafe impl Sync for Chunk {}

impl Chunk {
    /// `len` (a multiple of [`HUGE_PAGE`]) bytes, zero, at a 2 MiB boundary.
    fn new(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if let Some(ptr) = map_huge(len) {
            return Self {
                ptr,
                len,
                mapped: true,
            };
        }
        let ptr = if len == 0 {
            NonNull::dangling()
        } else {
            let layout = Self::layout(len);
            // SAFETY: the layout's size is not zero.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
        };
        Self {
            ptr,
            len,
            mapped: false,
        }
    }

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len, HUGE_PAGE).expect("chunk sizes are small")
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if self.mapped {
            // SAFETY: `ptr..ptr + len` is exactly what `map_huge` kept mapped, and no range of it
            // is alive (they hold the chunk).
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
            return;
        }
        // (Not mapped: allocated. Outside Linux every chunk is.)
        if !self.mapped && self.len > 0 {
            // SAFETY: allocated in `Chunk::new` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
        }
    }
}

/// An anonymous private mapping of `len` bytes at a 2 MiB boundary, advised for huge pages;
/// `None` where the kernel refuses the mapping (the caller allocates instead). A refused advice
/// (a kernel without transparent huge pages) leaves ordinary pages.
#[cfg(target_os = "linux")]
fn map_huge(len: usize) -> Option<NonNull<u8>> {
    if len == 0 {
        return None;
    }
    // Map a huge page more than asked, then unmap what lies outside the aligned range.
    let padded = len + HUGE_PAGE;
    // SAFETY: a fresh anonymous mapping; no existing memory is touched.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            padded,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let (head, tail) = (aligned - start, start + padded - (aligned + len));
    // SAFETY: both ranges lie inside the mapping just made and outside what is kept.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    NonNull::new(aligned as *mut u8)
}

/// The chunk that small ranges are cut from and the offset of its first free byte; weak, so that
/// a chunk whose ranges are all dropped is unmapped.
static CURRENT: Mutex<(Weak<Chunk>, usize)> = Mutex::new((Weak::new(), 0));

/// Immutable bytes in a chunk that the kernel may back with 2 MiB pages (module docs). Clones
/// share the bytes.
#[derive(Clone)]
pub(crate) struct HugePageBytes {
    chunk: Arc<Chunk>,
    start: usize,
    len: usize,
}

impl HugePageBytes {
    /// `len` bytes written by `fill` (which gets them zeroed), then read-only.
    pub(crate) fn new(len: usize, fill: impl FnOnce(&mut [u8])) -> Self {
        let (chunk, start) = Self::reserve(len);
        // SAFETY: `start..start + len` lies inside the chunk and was handed to no other range
        // (`reserve` moves the chunk's free offset past it under the lock); nothing reads it
        // until this range is returned.
        let bytes = unsafe { std::slice::from_raw_parts_mut(chunk.ptr.as_ptr().add(start), len) };
        fill(bytes);
        Self { chunk, start, len }
    }

    /// A copy of `bytes`.
    pub(crate) fn copy_of(bytes: &[u8]) -> Self {
        Self::new(bytes.len(), |out| out.copy_from_slice(bytes))
    }

    /// A chunk with `len` free bytes and where they start.
    fn reserve(len: usize) -> (Arc<Chunk>, usize) {
        if len >= CHUNK / 2 {
            return (Arc::new(Chunk::new(len.next_multiple_of(HUGE_PAGE))), 0);
        }
        let mut current = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(chunk) = current.0.upgrade() {
            let start = current.1.next_multiple_of(RANGE_ALIGN);
            if start + len <= chunk.len {
                current.1 = start + len;
                return (chunk, start);
            }
        }
        let chunk = Arc::new(Chunk::new(CHUNK));
        *current = (Arc::downgrade(&chunk), len);
        (chunk, 0)
    }
}

impl Deref for HugePageBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `start..start + len` lies inside the chunk, which this range keeps alive, and
        // was written before the range was made.
        unsafe { std::slice::from_raw_parts(self.chunk.ptr.as_ptr().add(self.start), self.len) }
    }
}

/// Whether the mapping that holds `address` is advised for huge pages: `/proc/self/smaps` lists
/// the flag `hg` (`VM_HUGEPAGE`) for it. `None` where the kernel has no transparent huge pages
/// (nothing to advise). Whether the kernel then backs it with huge pages depends on the machine's
/// free memory, so that is not what this asks.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn advised_for_huge_pages(address: *const u8) -> Option<bool> {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let address = address as usize;
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
    let mut inside = false;
    for line in smaps.lines() {
        if let Some(range) = mapping_range(line) {
            inside = range.contains(&address);
        } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
            return Some(flags.split_whitespace().any(|f| f == "hg"));
        }
    }
    panic!("no mapping in /proc/self/smaps holds {address:#x}")
}

/// The addresses of the mapping a line of `/proc/self/maps` or `smaps` starts (`from-to …` in
/// hex); `None` for the other lines of `smaps`.
#[cfg(all(test, target_os = "linux"))]
fn mapping_range(line: &str) -> Option<std::ops::Range<usize>> {
    let (from, to) = line.split(' ').next()?.split_once('-')?;
    Some(usize::from_str_radix(from, 16).ok()?..usize::from_str_radix(to, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_hold_their_own_bytes() {
        let ranges: Vec<HugePageBytes> = (0..200u32)
            .map(|i| {
                let len = (i as usize * 7919) % 300_000;
                HugePageBytes::new(len, |out| {
                    assert!(out.iter().all(|&b| b == 0), "a range starts zeroed");
                    out.iter_mut()
                        .enumerate()
                        .for_each(|(j, b)| *b = (j as u32 ^ i) as u8)
                })
            })
            .collect();
        for (i, range) in ranges.iter().enumerate() {
            assert_eq!(range.len(), (i * 7919) % 300_000);
            assert_eq!(range.as_ptr() as usize % RANGE_ALIGN, 0);
            let i = i as u32;
            assert!(
                range
                    .iter()
                    .enumerate()
                    .all(|(j, &b)| b == (j as u32 ^ i) as u8)
            );
        }
        let big = HugePageBytes::copy_of(&vec![7u8; CHUNK]);
        assert!(big.iter().all(|&b| b == 7));
        assert_eq!(big.as_ptr() as usize % HUGE_PAGE, 0);
    }

    /// Ranges just under half a chunk fill chunks and go on in new ones, and a range longer than
    /// a chunk gets one of its own: each holds its own bytes, none runs past its chunk.
    #[test]
    fn ranges_that_fill_chunks_and_ranges_longer_than_a_chunk_hold_their_own_bytes() {
        let lens = [CHUNK / 2 - 1, CHUNK / 2 - 1, CHUNK / 2 - 1, CHUNK + 5, 100];
        let ranges: Vec<HugePageBytes> = (0u8..)
            .zip(lens)
            .map(|(i, len)| HugePageBytes::copy_of(&vec![i + 1; len]))
            .collect();
        for ((i, len), range) in (0u8..).zip(lens).zip(&ranges) {
            assert_eq!(range.len(), len);
            assert!(
                range.iter().all(|&b| b == i + 1),
                "range {i} of {len} bytes"
            );
            let (start, end) = (range.start, range.start + range.len);
            assert!(
                end <= range.chunk.len,
                "{start}..{end} in {}",
                range.chunk.len
            );
        }
    }

    /// Small ranges made one after the other are cut from one chunk, not each from a chunk of its
    /// own (32 MiB each). (Another test's ranges may fill the chunk in between: tried again.)
    #[test]
    fn small_ranges_share_a_chunk() {
        for _ in 0..20 {
            let first = HugePageBytes::copy_of(&[1u8; 1 << 16]);
            let second = HugePageBytes::copy_of(&[2u8; 1 << 16]);
            if Arc::ptr_eq(&first.chunk, &second.chunk) {
                return;
            }
        }
        panic!("two 64 KiB ranges made one after the other never shared a chunk");
    }

    /// Whether any mapping of this process holds `address` (`/proc/self/maps`).
    #[cfg(target_os = "linux")]
    fn mapped(address: usize) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
        maps.lines()
            .any(|line| mapping_range(line).is_some_and(|range| range.contains(&address)))
    }

    /// The process's mapped bytes (`VmSize` in `/proc/self/status`).
    #[cfg(target_os = "linux")]
    fn mapped_bytes() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let line = status.lines().find_map(|l| l.strip_prefix("VmSize:"));
        let kb = line.and_then(|l| l.trim().strip_suffix("kB")?.trim().parse::<usize>().ok());
        kb.expect("VmSize in /proc/self/status") * 1024
    }

    /// A chunk stays mapped while any range cut from it lives and is unmapped with the last one.
    /// (Another test's mapping may take the freed addresses at once: tried again, it cannot do so
    /// every time.)
    #[cfg(target_os = "linux")]
    #[test]
    fn a_chunk_is_unmapped_with_its_last_range() {
        for _ in 0..20 {
            let range = HugePageBytes::new(CHUNK, |_| ());
            let address = range.as_ptr() as usize;
            let clone = range.clone();
            drop(range);
            assert!(mapped(address), "unmapped while a range of it lives");
            drop(clone);
            if !mapped(address) {
                return;
            }
        }
        panic!("a chunk's mapping outlived its last range, 20 times");
    }

    /// `map_huge` keeps exactly the `len` bytes from a 2 MiB boundary and unmaps the rest of what
    /// it mapped: the process maps `len` bytes more. (Other tests map and unmap meanwhile: tried
    /// again until one try saw no other change.)
    #[cfg(target_os = "linux")]
    #[test]
    fn a_mapping_keeps_its_aligned_bytes_and_unmaps_the_rest() {
        let len = 3 * HUGE_PAGE;
        for _ in 0..100 {
            let before = mapped_bytes();
            let Some(ptr) = map_huge(len) else {
                return; // the kernel refused the mapping: nothing of it to check
            };
            let after = mapped_bytes();
            // SAFETY: the mapping just made, used by nothing else.
            unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
            assert_eq!(ptr.as_ptr() as usize % HUGE_PAGE, 0);
            if after.wrapping_sub(before) == len {
                return;
            }
        }
        panic!("no try of map_huge({len}) mapped exactly {len} bytes");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn chunks_are_advised_for_huge_pages() {
        let small = HugePageBytes::copy_of(&[1u8; 4096]);
        let large = HugePageBytes::new(CHUNK, |_| ());
        // Where the kernel has transparent huge pages, the chunks are advised and the stack is
        // not (the check itself can tell them apart).
        let thp = std::fs::metadata("/sys/kernel/mm/transparent_hugepage/enabled").is_ok();
        for range in [small, large] {
            assert_eq!(advised_for_huge_pages(range.as_ptr()), thp.then_some(true));
        }
        let on_the_stack = 0u8;
        assert_eq!(advised_for_huge_pages(&on_the_stack), thp.then_some(false));
    }
}
