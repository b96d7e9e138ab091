//! The kernel heap: the RAM from the end of the image (`__image_end`, from
//! the linker script) to the top of low memory, carved into size classes
//! with free lists under a spin lock. Small blocks are powers of two from
//! 16 bytes to a page; bigger ones whole pages (a 32 KiB goroutine stack
//! plus its soft-guard page is a 9-page block), up to 64 pages, then
//! powers of two. Freed blocks go back to their class's list; nothing is
//! coalesced: enough for a reference kernel, and predictable.
//!
//! What gokernel asks of it (docs/bare-metal.md): it is called from
//! goroutines and from g0 stacks, with gokernel's scheduler and channel
//! locks held, never from an interrupt handler; it must not block or
//! call back into gokernel. Here the lock is taken with interrupts off,
//! so an interrupt handler never finds it held by its own CPU.
//!
//! Fresh memory is assumed zeroed (QEMU hands the guest zeroed RAM):
//! `alloc_zeroed` clears only recycled blocks, so a goroutine stack costs
//! host memory only for the pages it touches.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::null_mut;

use crate::x86::{irq_restore, irq_save};

const PAGE: usize = 4096;
/// Classes: 16 B ..= 4 KiB (9), 2 ..= 64 pages (63), then 128 pages,
/// 256 pages, … (up to 2^30 bytes).
const SMALL: usize = 9;
const PAGES: usize = 63;
const NCLASSES: usize = SMALL + PAGES + 12;

struct Heap {
    free: [*mut u8; NCLASSES],
    bump: usize,
    end: usize,
    /// Bytes handed out and not freed, and its high-water mark.
    in_use: usize,
    peak: usize,
}

// SAFETY: the pointers are to memory the heap owns; used under the lock.
unsafe impl Send for Heap {}

pub struct Alloc {
    heap: spin::Mutex<Heap>,
}

/// The class of `l` and its block size, or None if too big.
fn class_of(l: Layout) -> Option<(usize, usize)> {
    let size = l.size().max(l.align()).max(16);
    if size <= PAGE {
        let s = size.next_power_of_two();
        return Some((s.trailing_zeros() as usize - 4, s));
    }
    let pages = size.div_ceil(PAGE);
    if pages <= 64 {
        return Some((SMALL + pages - 2, pages * PAGE));
    }
    let s = (pages * PAGE).next_power_of_two();
    let c = SMALL + PAGES + (s.trailing_zeros() as usize - 19);
    (c < NCLASSES).then_some((c, s))
}

impl Alloc {
    pub const fn new() -> Self {
        Alloc {
            heap: spin::Mutex::new(Heap {
                free: [null_mut(); NCLASSES],
                bump: 0,
                end: 0,
                in_use: 0,
                peak: 0,
            }),
        }
    }

    /// Hands `[start, end)` to the heap (once, at boot).
    pub fn init(&self, start: usize, end: usize) {
        let mut h = self.heap.lock();
        h.bump = start;
        h.end = end;
    }

    /// (bytes in use, the most ever in use, bytes never handed out).
    pub fn usage(&self) -> (usize, usize, usize) {
        let on = irq_save();
        let h = self.heap.lock();
        let r = (h.in_use, h.peak, h.end - h.bump);
        drop(h);
        irq_restore(on);
        r
    }

    /// A block of `layout`, and whether it was recycled (maybe dirty).
    fn take(&self, layout: Layout) -> (*mut u8, bool) {
        // Blocks of a page or more are page aligned; smaller ones are
        // aligned to their size.
        if layout.align() > PAGE {
            return (null_mut(), false);
        }
        let Some((c, size)) = class_of(layout) else {
            return (null_mut(), false);
        };
        let on = irq_save();
        let mut h = self.heap.lock();
        let p = h.free[c];
        let r = if !p.is_null() {
            // SAFETY: a free block holds the next free block's address.
            h.free[c] = unsafe { *(p as *mut *mut u8) };
            (p, true)
        } else {
            let start = h.bump.next_multiple_of(size.min(PAGE));
            if start + size > h.end {
                (null_mut(), false)
            } else {
                h.bump = start + size;
                (start as *mut u8, false)
            }
        };
        if !r.0.is_null() {
            h.in_use += size;
            h.peak = h.peak.max(h.in_use);
        }
        drop(h);
        irq_restore(on);
        r
    }
}

// SAFETY: blocks are disjoint, at least `layout.size()` long, aligned to
// at least `layout.align()` (refused above a page); fresh memory is zero.
unsafe impl GlobalAlloc for Alloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.take(layout).0
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (p, recycled) = self.take(layout);
        if recycled {
            // SAFETY: p is a block of at least layout.size() bytes.
            unsafe { core::ptr::write_bytes(p, 0, layout.size()) };
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        let Some((c, size)) = class_of(layout) else {
            return;
        };
        let on = irq_save();
        let mut h = self.heap.lock();
        // SAFETY: the block is ours again and at least 16 bytes.
        unsafe { *(p as *mut *mut u8) = h.free[c] };
        h.free[c] = p;
        h.in_use -= size;
        drop(h);
        irq_restore(on);
    }
}
