//! The image's global allocator: power-of-two size classes carved from
//! `mmap`'d chunks, with free lists under a spin lock; large blocks are
//! their own mappings. Small, and enough for the runtime's Gs, Ms, stacks
//! (each its own mapping: a 32 KiB `STACK_MIN` stack plus its soft-guard
//! page is past the largest class) and closures.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::null_mut;

use crate::sys::{mmap_anon, munmap};

/// Largest size class; bigger blocks get their own mapping.
const MAX_CLASS: usize = 32 * 1024;
/// Classes 16, 32, ..., MAX_CLASS.
const NCLASSES: usize = 12;
/// Bytes mapped at a time for small blocks.
const CHUNK: usize = 4 << 20;

struct Heap {
    free: [*mut u8; NCLASSES],
    bump: usize,
    end: usize,
}

// SAFETY: the pointers are to memory the heap owns; only used under the lock.
unsafe impl Send for Heap {}

pub struct Alloc {
    heap: spin::Mutex<Heap>,
}

impl Alloc {
    pub const fn new() -> Self {
        Alloc {
            heap: spin::Mutex::new(Heap {
                free: [null_mut(); NCLASSES],
                bump: 0,
                end: 0,
            }),
        }
    }
}

fn class_of(l: Layout) -> Option<usize> {
    let size = l.size().max(l.align()).max(16).next_power_of_two();
    (size <= MAX_CLASS).then(|| size.trailing_zeros() as usize - 4)
}

// SAFETY: blocks are disjoint, at least `layout.size()` long and aligned to
// their (power-of-two) class size, which is at least `layout.align()`.
unsafe impl GlobalAlloc for Alloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = class_of(layout) else {
            // Page-aligned; larger alignments are not needed by the image.
            if layout.align() > 4096 {
                return null_mut();
            }
            return mmap_anon(layout.size().next_multiple_of(4096));
        };
        let size = 16usize << c;
        let mut h = self.heap.lock();
        let p = h.free[c];
        if !p.is_null() {
            // SAFETY: a free block holds the next free block's address.
            h.free[c] = unsafe { *(p as *mut *mut u8) };
            return p;
        }
        let mut start = h.bump.next_multiple_of(size);
        if start + size > h.end {
            let chunk = mmap_anon(CHUNK);
            if chunk.is_null() {
                return null_mut();
            }
            h.bump = chunk as usize;
            h.end = chunk as usize + CHUNK;
            start = h.bump; // chunks are page aligned: >= every class
        }
        h.bump = start + size;
        start as *mut u8
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match class_of(layout) {
            Some(c) => {
                let mut h = self.heap.lock();
                // SAFETY: the block is ours again and at least 16 bytes.
                unsafe { *(p as *mut *mut u8) = h.free[c] };
                h.free[c] = p;
            }
            // SAFETY: a large block is exactly one mapping of this length.
            None => unsafe { munmap(p, layout.size().next_multiple_of(4096)) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarding the caller's layout.
        let p = unsafe { self.alloc(layout) };
        if !p.is_null() && class_of(layout).is_some() {
            // SAFETY: p is a fresh block of at least layout.size() bytes.
            unsafe { core::ptr::write_bytes(p, 0, layout.size()) };
        }
        p
    }
}
