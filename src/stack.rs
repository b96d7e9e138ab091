//! Goroutine stacks: `stackalloc` / `stackfree` (Go's `stack.go`).
//!
//! Every stack has a guard region just below its usable part `[lo, hi)`:
//!
//! - Hosted, a stack is normally its own `mmap` with a `PROT_NONE` guard
//!   page below `lo`: running off the end faults, and the signal handler
//!   reports the overflow. Each such stack costs two kernel mappings, and
//!   Linux allows 65,530 per process by default (`vm.max_map_count`), so
//!   only `guard_page_budget()` stacks (16,384 by default: 32,768 mappings)
//!   get one.
//! - Beyond that budget, stacks are carved from arenas: one mapping holds
//!   256 stacks, each with a *soft* guard region: the page below `lo`,
//!   which must stay zero. The scheduler checks its top
//!   [`SOFT_GUARD_CHECK`] bytes every time the G switches out, and the
//!   fault handler checks it on any fault. An overflow that writes there is
//!   reported at the next switch; a frame large enough to jump over the
//!   whole page can corrupt the stack below unnoticed — the price of a
//!   million stacks.
//! - Freestanding, stacks come from the global allocator with the same
//!   soft guard region.
//!
//! Checking a soft guard costs no memory: the page is never written, and
//! reading an untouched page maps the kernel's shared zero page.
//!
//! The memory is owned by a [`StackMem`], which frees it on drop (an arena
//! stack goes back to its arena, its pages returned to the kernel); a [`G`]
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

/// Owned stack memory: `[lo, hi)` plus its guard region. Freed on drop.
#[derive(Debug)]
pub struct StackMem {
    /// The usable part.
    stack: Stack,
    kind: Kind,
    /// Valgrind's id for the stack (0 when not running under Valgrind).
    #[cfg(feature = "std")]
    vg_id: usize,
}

#[derive(Debug)]
enum Kind {
    /// Its own mapping; the guard page at `base` is `PROT_NONE`.
    #[cfg(feature = "std")]
    Mapped { base: *mut u8, len: usize },
    /// A slot of an arena; the page below `lo` is a soft guard.
    #[cfg(feature = "std")]
    Arena { slot: usize, len: usize },
    /// From the global allocator; the page below `lo` is a soft guard.
    #[cfg(not(feature = "std"))]
    Heap { base: *mut u8, len: usize },
}

// SAFETY: a StackMem is plain owned memory; nothing in it is tied to the
// thread that allocated it (munmap / dealloc work from any thread).
unsafe impl Send for StackMem {}

/// Bytes at the top of a soft guard region (just below `lo`) that
/// [`stackguard_ok`] checks.
pub const SOFT_GUARD_CHECK: usize = 64;

impl StackMem {
    /// The usable bounds `[lo, hi)`.
    pub fn bounds(&self) -> Stack {
        self.stack
    }

    /// True if the stack's guard is a soft one (checked by the scheduler)
    /// rather than a guard page (checked by the hardware).
    pub fn has_soft_guard(&self) -> bool {
        match self.kind {
            #[cfg(feature = "std")]
            Kind::Mapped { .. } => false,
            #[cfg(feature = "std")]
            Kind::Arena { .. } => true,
            #[cfg(not(feature = "std"))]
            Kind::Heap { .. } => true,
        }
    }
}

/// True unless `mem`'s soft guard region has been written: the G using it
/// ran off its stack. Always true for a stack with a guard page.
pub fn stackguard_ok(mem: &StackMem) -> bool {
    if !mem.has_soft_guard() {
        return true;
    }
    let top = mem.stack.lo;
    (0..SOFT_GUARD_CHECK / 8).all(|i| {
        // SAFETY: the soft guard page below lo belongs to this stack's
        // allocation and is readable.
        unsafe { ((top - SOFT_GUARD_CHECK + 8 * i) as *const u64).read_volatile() == 0 }
    })
}

/// True unless any word of `mem`'s soft guard page was written: the
/// thorough check the fault handler makes (the scheduler checks only the
/// top [`SOFT_GUARD_CHECK`] bytes, at every switch).
pub fn soft_guard_page_clean(mem: &StackMem) -> bool {
    if !mem.has_soft_guard() {
        return true;
    }
    let base = mem.stack.lo - PAGE_SIZE;
    (0..PAGE_SIZE / 8).all(|i| {
        // SAFETY: the soft guard page belongs to this stack's allocation.
        unsafe { ((base + 8 * i) as *const u64).read_volatile() == 0 }
    })
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
    imp::alloc(size)
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
        #[cfg(feature = "std")]
        if self.vg_id != 0 {
            valgrind::stack_deregister(self.vg_id);
        }
        // SAFETY: the kind and addresses are what imp::alloc made, and the
        // StackMem is being dropped, so nothing refers to the memory.
        unsafe { imp::free(&self.kind) }
    }
}

#[cfg(feature = "std")]
pub use imp::{guard_page_budget, set_guard_page_budget};

/// Valgrind client requests: telling Valgrind where goroutine stacks are,
/// so that its memory checker treats a jump of the stack pointer between
/// them as a switch of stacks rather than a huge push or pop. Outside
/// Valgrind the request is a handful of no-op instructions.
#[cfg(feature = "std")]
mod valgrind {
    const STACK_REGISTER: usize = 0x1501;
    const STACK_DEREGISTER: usize = 0x1502;

    /// Valgrind's "special instruction sequence" for a client request on
    /// amd64: rotations of rdi by 3 + 13 + 61 + 51 = 128 bits (a no-op),
    /// then `xchg rbx, rbx`; rax points at the request and its arguments,
    /// rdx holds the result (the default when not under Valgrind).
    fn request(args: [usize; 6], default: usize) -> usize {
        let result: usize;
        // SAFETY: outside Valgrind these instructions change nothing but
        // the flags (rol) and leave rdi and rbx as they were; under
        // Valgrind they are its documented client-request protocol.
        unsafe {
            core::arch::asm!(
                "rol rdi, 3",
                "rol rdi, 13",
                "rol rdi, 61",
                "rol rdi, 51",
                "xchg rbx, rbx",
                in("rax") args.as_ptr(),
                inout("rdx") default => result,
                in("rdi") 0usize,
                options(nostack),
            );
        }
        result
    }

    /// `VALGRIND_STACK_REGISTER(lo, hi)`: returns an id (0 outside Valgrind).
    pub(super) fn stack_register(lo: usize, hi: usize) -> usize {
        request([STACK_REGISTER, lo, hi, 0, 0, 0], 0)
    }

    /// `VALGRIND_STACK_DEREGISTER(id)`.
    pub(super) fn stack_deregister(id: usize) {
        request([STACK_DEREGISTER, id, 0, 0, 0, 0], 0);
    }
}

#[cfg(feature = "std")]
mod imp {
    use core::sync::atomic::{AtomicUsize, Ordering};

    use super::{Kind, PAGE_SIZE, StackError, StackMem};
    use crate::runtime2::Stack;

    /// Stacks in one arena mapping.
    const ARENA_SLOTS: usize = 256;

    /// Live stacks that have their own guarded mapping.
    static MAPPED: AtomicUsize = AtomicUsize::new(0);
    /// How many may (two kernel mappings each).
    static BUDGET: AtomicUsize = AtomicUsize::new(16_384);

    /// How many stacks may have a guard page of their own at once; the
    /// rest come from arenas with soft guards.
    pub fn guard_page_budget() -> usize {
        BUDGET.load(Ordering::Relaxed)
    }

    /// Sets [`guard_page_budget`] (process-wide): lower it if the process
    /// needs its mappings for other things, raise it if
    /// `vm.max_map_count` was raised.
    pub fn set_guard_page_budget(n: usize) {
        BUDGET.store(n, Ordering::Relaxed);
    }

    /// Free slots and the unused tail of the newest arena, for one size.
    struct Pool {
        size: usize,
        free: alloc::vec::Vec<usize>,
        next: usize,
        end: usize,
    }

    static POOLS: spin::Mutex<alloc::vec::Vec<Pool>> = spin::Mutex::new(alloc::vec::Vec::new());

    fn map(len: usize) -> *mut u8 {
        // SAFETY: an anonymous private mapping at a kernel-chosen address
        // touches no existing memory.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            core::ptr::null_mut()
        } else {
            p.cast()
        }
    }

    pub(super) fn alloc(size: usize) -> Result<StackMem, StackError> {
        if MAPPED.fetch_add(1, Ordering::Relaxed) < BUDGET.load(Ordering::Relaxed)
            && let Some(m) = alloc_mapped(size)
        {
            return Ok(m);
        }
        MAPPED.fetch_sub(1, Ordering::Relaxed);
        alloc_arena(size)
    }

    /// One `mmap` of guard + stack; the guard page is made `PROT_NONE`.
    fn alloc_mapped(size: usize) -> Option<StackMem> {
        let len = size + PAGE_SIZE;
        let base = map(len);
        if base.is_null() {
            return None;
        }
        // SAFETY: the first page lies inside the mapping just made.
        if unsafe { libc::mprotect(base.cast(), PAGE_SIZE, libc::PROT_NONE) } != 0 {
            // SAFETY: unmapping the mapping just made, which nothing uses.
            unsafe { libc::munmap(base.cast(), len) };
            return None;
        }
        let lo = base as usize + PAGE_SIZE;
        Some(StackMem {
            stack: Stack { lo, hi: lo + size },
            kind: Kind::Mapped { base, len },
            vg_id: super::valgrind::stack_register(lo, lo + size),
        })
    }

    /// A slot of an arena: a soft guard page, then the stack.
    fn alloc_arena(size: usize) -> Result<StackMem, StackError> {
        let len = size + PAGE_SIZE;
        let mut pools = POOLS.lock();
        let pool = match pools.iter().position(|p| p.size == size) {
            Some(i) => &mut pools[i],
            None => {
                pools.push(Pool {
                    size,
                    free: alloc::vec::Vec::new(),
                    next: 0,
                    end: 0,
                });
                pools.last_mut().expect("just pushed")
            }
        };
        let slot = match pool.free.pop() {
            Some(slot) => slot,
            None => {
                if pool.next == pool.end {
                    let arena = map(len * ARENA_SLOTS);
                    if arena.is_null() {
                        return Err(StackError::OutOfMemory { size });
                    }
                    pool.next = arena as usize;
                    pool.end = arena as usize + len * ARENA_SLOTS;
                }
                let slot = pool.next;
                pool.next += len;
                slot
            }
        };
        let lo = slot + PAGE_SIZE;
        Ok(StackMem {
            stack: Stack { lo, hi: lo + size },
            kind: Kind::Arena { slot, len },
            vg_id: super::valgrind::stack_register(lo, lo + size),
        })
    }

    /// # Safety
    /// `kind` must describe memory made by [`alloc`] that nothing uses.
    pub(super) unsafe fn free(kind: &Kind) {
        match *kind {
            Kind::Mapped { base, len } => {
                // SAFETY: per the contract, the mapping is ours and unused.
                let rc = unsafe { libc::munmap(base.cast(), len) };
                debug_assert_eq!(rc, 0, "munmap of a goroutine stack failed");
                MAPPED.fetch_sub(1, Ordering::Relaxed);
            }
            Kind::Arena { slot, len } => {
                // Give the pages back; they read as zero again, which also
                // re-arms the soft guard.
                // SAFETY: the slot is ours and unused.
                unsafe { libc::madvise(slot as *mut libc::c_void, len, libc::MADV_DONTNEED) };
                let size = len - PAGE_SIZE;
                let mut pools = POOLS.lock();
                if let Some(p) = pools.iter_mut().find(|p| p.size == size) {
                    p.free.push(slot);
                }
            }
        }
    }
}

#[cfg(not(feature = "std"))]
mod imp {
    use super::{Kind, PAGE_SIZE, StackError, StackMem};
    use crate::runtime2::Stack;
    use alloc::alloc::{Layout, alloc_zeroed, dealloc};

    fn layout(len: usize) -> Layout {
        // PAGE_SIZE is a power of two and len was checked against STACK_MAX,
        // so this cannot fail.
        Layout::from_size_align(len, PAGE_SIZE).expect("stack layout")
    }

    /// Zeroed, page-aligned memory from the global allocator: a soft guard
    /// page, then the stack.
    pub(super) fn alloc(size: usize) -> Result<StackMem, StackError> {
        let len = size + PAGE_SIZE;
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout(len)) };
        if base.is_null() {
            return Err(StackError::OutOfMemory { size });
        }
        let lo = base as usize + PAGE_SIZE;
        Ok(StackMem {
            stack: Stack { lo, hi: lo + size },
            kind: Kind::Heap { base, len },
        })
    }

    /// # Safety
    /// `kind` must come from [`alloc`] and be unused.
    pub(super) unsafe fn free(kind: &Kind) {
        let Kind::Heap { base, len } = *kind;
        // SAFETY: per the contract, allocated by `alloc` with this layout.
        unsafe { dealloc(base, layout(len)) }
    }
}
