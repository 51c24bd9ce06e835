//! Host memory per rank: a global allocator that attributes every allocation to the rank (the
//! thread's tag) that made it, current and peak, for ranks running as threads.
//!
//! Install it in the binary that measures (a test, a benchmark, the example):
//! `#[global_allocator] static ALLOC: TrackingAllocator = TrackingAllocator;`. `run_world`
//! tags each rank thread ([`set_rank`]); allocations of untagged threads (main, Rayon workers'
//! scratch buffers) count as tag 0. Each block carries its owner in a small header, so a buffer
//! freed by another thread (a collective's input, freed by the last rank to read it) is
//! subtracted from its owner; a message received over point-to-point is copied onto the
//! receiver ([`adopt`]), so it counts where it is held.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// Tags counted (rank `r` is tag `r + 1`; ranks past that share the last tag).
pub const MAX_TAGS: usize = 256;

static INSTALLED: AtomicBool = AtomicBool::new(false);

/// One tag's counters on a cache line of their own (rank threads allocate concurrently).
#[repr(align(64))]
struct Counters {
    current: AtomicI64,
    peak: AtomicI64,
}

static TAGS: [Counters; MAX_TAGS] = [const { Counters { current: AtomicI64::new(0), peak: AtomicI64::new(0) } }; MAX_TAGS];

thread_local! {
    static TAG: Cell<u16> = const { Cell::new(0) };
}

/// The allocator; see the [module docs](self).
#[derive(Debug, Default, Clone, Copy)]
pub struct TrackingAllocator;

/// Bytes before each block: at least 16 and the block's alignment (so the block stays aligned);
/// the owner tag sits in the 8 bytes just before the block.
fn header(align: usize) -> usize {
    align.max(16)
}

fn account(tag: usize, delta: i64) {
    let c = &TAGS[tag.min(MAX_TAGS - 1)];
    let now = c.current.fetch_add(delta, Ordering::Relaxed) + delta;
    if delta > 0 && now > c.peak.load(Ordering::Relaxed) {
        c.peak.fetch_max(now, Ordering::Relaxed);
    }
}

/// Writes `tag` before the block at `base + h` and returns the block.
///
/// # Safety
/// `base` is a block of at least `h + 1` bytes with `h >= 16`.
unsafe fn tag_block(base: *mut u8, h: usize, tag: usize) -> *mut u8 {
    // SAFETY: `base + h` is inside the block, `h >= 16`, so the 8 bytes before it are too.
    unsafe {
        let ptr = base.add(h);
        (ptr.sub(8) as *mut u64).write_unaligned(tag as u64);
        ptr
    }
}

fn this_tag() -> usize {
    TAG.try_with(|t| t.get()).unwrap_or(0) as usize
}

unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the same layout.
        unsafe { self.alloc_with(layout, |outer| System.alloc(outer)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the same layout (calloc keeps its lazily zeroed pages).
        unsafe { self.alloc_with(layout, |outer| System.alloc_zeroed(outer)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let h = header(layout.align());
        // SAFETY: `ptr` came from `alloc` with this layout: the header is before it.
        unsafe {
            let tag = (ptr.sub(8) as *const u64).read_unaligned() as usize;
            account(tag, -(layout.size() as i64));
            System.dealloc(ptr.sub(h), Layout::from_size_align_unchecked(layout.size() + h, h));
        }
    }

    /// In place where the system can (mremap for large blocks); the block keeps its owner.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let h = header(layout.align());
        // SAFETY: `ptr` came from `alloc` with `layout`; the outer block starts `h` before it and
        // System.realloc keeps its first `h` bytes (the header) at the new address.
        unsafe {
            let tag = (ptr.sub(8) as *const u64).read_unaligned() as usize;
            // The new outer layout must be valid (size ≤ isize::MAX once aligned), as for alloc.
            let Some(outer) = new_size.checked_add(h).and_then(|n| Layout::from_size_align(n, h).ok()) else { return std::ptr::null_mut() };
            let base = System.realloc(ptr.sub(h), Layout::from_size_align_unchecked(layout.size() + h, h), outer.size());
            if base.is_null() {
                return base;
            }
            account(tag, new_size as i64 - layout.size() as i64);
            base.add(h)
        }
    }
}

impl TrackingAllocator {
    /// Allocates `layout` plus the header with `raw`, tagged with this thread's rank.
    ///
    /// # Safety
    /// `raw` allocates the given non-zero-size layout (or returns null).
    unsafe fn alloc_with(&self, layout: Layout, raw: impl FnOnce(Layout) -> *mut u8) -> *mut u8 {
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
        }
        let h = header(layout.align());
        let Ok(outer) = Layout::from_size_align(layout.size() + h, h) else { return std::ptr::null_mut() };
        let base = raw(outer);
        if base.is_null() {
            return base;
        }
        let tag = this_tag();
        account(tag, layout.size() as i64);
        // SAFETY: `outer` is `h + size` bytes, `h >= 16`.
        unsafe { tag_block(base, h, tag) }
    }
}

/// Whether the tracking allocator is the global allocator of this program (it has allocated).
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Attributes this thread's allocations from now on to `rank` (`None`: untagged).
pub fn set_rank(rank: Option<usize>) {
    let tag = rank.map_or(0, |r| (r + 1).min(MAX_TAGS - 1));
    TAG.with(|t| t.set(tag as u16));
}

fn tag(rank: usize) -> usize {
    (rank + 1).min(MAX_TAGS - 1)
}

/// Bytes `rank`'s allocations hold now.
pub fn current(rank: usize) -> i64 {
    TAGS[tag(rank)].current.load(Ordering::Relaxed)
}

/// The most bytes `rank`'s allocations held at once since the last [`reset_peak`].
pub fn peak(rank: usize) -> i64 {
    TAGS[tag(rank)].peak.load(Ordering::Relaxed)
}

/// Starts a new peak measurement for `rank` from what it holds now.
pub fn reset_peak(rank: usize) {
    let c = &TAGS[tag(rank)];
    c.peak.store(c.current.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Runs `f` on a thread of its own, counted as `rank`, and returns its result with the most
/// heap bytes it held at once above what that thread held when it started (0 where the tracking
/// allocator is not installed). For benchmarks of one operation's memory.
pub fn peak_of<T: Send>(rank: usize, f: impl FnOnce() -> T + Send) -> (T, i64) {
    std::thread::scope(|s| {
        s.spawn(|| {
            set_rank(Some(rank));
            let start = current(rank);
            reset_peak(rank);
            let out = f();
            (out, peak(rank) - start)
        })
        .join()
        .expect("the measured closure panicked")
    })
}

/// `data` owned by this thread's rank: copied when the tracker is installed (a point-to-point
/// message arrives in the sender's buffer), as is otherwise.
pub fn adopt(data: burn::tensor::TensorData) -> burn::tensor::TensorData {
    if !installed() {
        return data;
    }
    burn::tensor::TensorData::from_bytes_vec(data.as_bytes().to_vec(), data.shape.clone(), data.dtype)
}
