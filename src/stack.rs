//! Goroutine stacks: `stackalloc` / `stackfree` (Go's `stack.go`).
//!
//! Hosted (`std`), a stack is its own `mmap` with a `PROT_NONE` guard page
//! below `lo`: running off the end faults instead of corrupting the
//! neighbour. Freestanding, stacks come from the global allocator (the
//! platform layer will take this over).
//!
//! The memory is owned by a [`StackMem`], which frees it on drop; a [`G`]
//! made by [`malg`](crate::proc::malg) holds its `StackMem`, so dropping the
//! G frees its stack.
//!
//! [`G`]: crate::runtime2::G

use crate::runtime2::Stack;

/// The page size stacks are rounded to and guarded with.
pub const PAGE_SIZE: usize = 4096;

/// The smallest stack [`stackalloc`] hands out: 16 KiB. Rust code formats,
/// unwinds and calls into libc; Go's 2 KiB would not hold it.
pub const STACK_MIN: usize = 16 * 1024;

/// The largest stack [`stackalloc`] hands out: 1 GiB (Go's `maxstacksize`
/// on 64-bit).
pub const STACK_MAX: usize = 1 << 30;

/// The default stack size for a G: 256 KiB of address space. Only the pages
/// a G touches cost memory.
pub const STACK_DEFAULT: usize = 256 * 1024;

/// Why a stack could not be allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackError {
    /// The size is below [`STACK_MIN`].
    TooSmall {
        /// The size asked for.
        size: usize,
    },
    /// The size is above [`STACK_MAX`].
    TooLarge {
        /// The size asked for.
        size: usize,
    },
    /// The size is not a multiple of [`PAGE_SIZE`].
    NotPageMultiple {
        /// The size asked for.
        size: usize,
    },
    /// The system had no memory (or mappings) left.
    OutOfMemory {
        /// The size asked for.
        size: usize,
    },
}

impl core::fmt::Display for StackError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            StackError::TooSmall { size } => {
                write!(
                    f,
                    "stack size {size} is below the minimum of {STACK_MIN} bytes"
                )
            }
            StackError::TooLarge { size } => {
                write!(
                    f,
                    "stack size {size} is above the maximum of {STACK_MAX} bytes"
                )
            }
            StackError::NotPageMultiple { size } => {
                write!(
                    f,
                    "stack size {size} is not a multiple of the {PAGE_SIZE}-byte page"
                )
            }
            StackError::OutOfMemory { size } => {
                write!(f, "out of memory allocating a {size}-byte stack")
            }
        }
    }
}

impl core::error::Error for StackError {}

/// Checks a stack size against [`STACK_MIN`], [`STACK_MAX`] and
/// [`PAGE_SIZE`].
pub const fn check_stack_size(size: usize) -> Result<(), StackError> {
    if size < STACK_MIN {
        Err(StackError::TooSmall { size })
    } else if size > STACK_MAX {
        Err(StackError::TooLarge { size })
    } else if !size.is_multiple_of(PAGE_SIZE) {
        Err(StackError::NotPageMultiple { size })
    } else {
        Ok(())
    }
}

/// Owned stack memory: `size` usable bytes, plus (hosted) one guard page
/// below them. Freed on drop.
#[derive(Debug)]
pub struct StackMem {
    /// Start of the whole allocation (the guard page, hosted).
    base: *mut u8,
    /// Length of the whole allocation.
    len: usize,
    /// The usable part.
    stack: Stack,
}

// SAFETY: a StackMem is plain owned memory; nothing in it is tied to the
// thread that allocated it (munmap / dealloc work from any thread).
unsafe impl Send for StackMem {}

impl StackMem {
    /// The usable bounds `[lo, hi)`.
    pub fn bounds(&self) -> Stack {
        self.stack
    }
}

/// Allocates a stack of `size` usable bytes (Go's `stackalloc`).
///
/// `size` must pass [`check_stack_size`]. The returned bounds have a
/// page-aligned (so 16-byte aligned) `hi`.
pub fn stackalloc(size: usize) -> Result<StackMem, StackError> {
    check_stack_size(size)?;
    if inject_failure() {
        return Err(StackError::OutOfMemory { size });
    }
    let mem = imp::alloc(size)?;
    // SAFETY: lo is the lowest word of the fresh stack, which is ours.
    unsafe { (mem.stack.lo as *mut u64).write(STACK_GUARD) };
    Ok(mem)
}

/// The word kept at the lowest address of every stack `stackalloc` makes.
/// A G that ran off its stack has overwritten it; the scheduler checks it
/// each time a G switches out ([`stackcheck`]). Freestanding stacks have no
/// guard page, so this is their overflow detection; hosted, the guard page
/// usually catches the overflow first.
pub const STACK_GUARD: u64 = 0x57ac_6a4d_0ddb_a11e;

/// True if `st`'s guard word is intact (or `st` has none: a g0).
pub fn stackguard_ok(st: &Stack) -> bool {
    // SAFETY: a non-zero lo is the first word of a live stack made by
    // stackalloc (g0s have lo == 0).
    st.lo == 0 || unsafe { (st.lo as *const u64).read_volatile() } == STACK_GUARD
}

/// Stack allocations still to fail on purpose (tests of out-of-memory
/// handling; see [`inject_stack_alloc_failures`]).
static FAIL_NEXT: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Makes the next `n` stack allocations fail with
/// [`StackError::OutOfMemory`], as if the system had run out: for tests of
/// what callers do then. Process-wide.
pub fn inject_stack_alloc_failures(n: usize) {
    FAIL_NEXT.store(n, core::sync::atomic::Ordering::SeqCst);
}

fn inject_failure() -> bool {
    use core::sync::atomic::Ordering::{Relaxed, SeqCst};
    FAIL_NEXT.load(Relaxed) != 0
        && FAIL_NEXT
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
}

/// Frees a stack (Go's `stackfree`). Same as dropping it.
pub fn stackfree(mem: StackMem) {
    drop(mem);
}

impl Drop for StackMem {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly what imp::alloc returned, and the
        // StackMem is being dropped, so nothing refers to the memory.
        unsafe { imp::free(self.base, self.len) }
    }
}

#[cfg(feature = "std")]
mod imp {
    use super::{PAGE_SIZE, StackError, StackMem};
    use crate::runtime2::Stack;

    /// One `mmap` of guard + stack; the guard page is made `PROT_NONE`.
    pub(super) fn alloc(size: usize) -> Result<StackMem, StackError> {
        let len = size + PAGE_SIZE;
        // SAFETY: an anonymous private mapping at a kernel-chosen address
        // touches no existing memory.
        let base = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(StackError::OutOfMemory { size });
        }
        // SAFETY: the first page lies inside the mapping just made.
        if unsafe { libc::mprotect(base, PAGE_SIZE, libc::PROT_NONE) } != 0 {
            // SAFETY: unmapping the mapping just made, which nothing uses.
            unsafe { libc::munmap(base, len) };
            return Err(StackError::OutOfMemory { size });
        }
        let base = base.cast::<u8>();
        let lo = base as usize + PAGE_SIZE;
        Ok(StackMem {
            base,
            len,
            stack: Stack { lo, hi: lo + size },
        })
    }

    /// # Safety
    /// `base`/`len` must describe a mapping made by [`alloc`] that nothing
    /// uses any more.
    pub(super) unsafe fn free(base: *mut u8, len: usize) {
        // SAFETY: per the contract, the mapping is ours and unused.
        let rc = unsafe { libc::munmap(base.cast(), len) };
        debug_assert_eq!(rc, 0, "munmap of a goroutine stack failed");
    }
}

#[cfg(not(feature = "std"))]
mod imp {
    use super::{PAGE_SIZE, StackError, StackMem};
    use crate::runtime2::Stack;
    use alloc::alloc::{Layout, alloc as global_alloc, dealloc};

    fn layout(len: usize) -> Layout {
        // PAGE_SIZE is a power of two and len was checked against STACK_MAX,
        // so this cannot fail.
        Layout::from_size_align(len, PAGE_SIZE).expect("stack layout")
    }

    /// Page-aligned memory from the global allocator; no guard page.
    pub(super) fn alloc(size: usize) -> Result<StackMem, StackError> {
        // SAFETY: the layout has a non-zero size (size >= STACK_MIN).
        let base = unsafe { global_alloc(layout(size)) };
        if base.is_null() {
            return Err(StackError::OutOfMemory { size });
        }
        let lo = base as usize;
        Ok(StackMem {
            base,
            len: size,
            stack: Stack { lo, hi: lo + size },
        })
    }

    /// # Safety
    /// `base`/`len` must come from [`alloc`] and be unused.
    pub(super) unsafe fn free(base: *mut u8, len: usize) {
        // SAFETY: per the contract, allocated by `alloc` with this layout.
        unsafe { dealloc(base, layout(len)) }
    }
}
