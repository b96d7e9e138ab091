//! Goroutine stacks: `stackalloc` / `stackfree` (Go's `stack.go`).
//!
//! # What is guaranteed
//!
//! Hosted (the `std` feature), **every stack the safe API makes has a
//! hardware guard**: a `PROT_NONE` page just below its usable part
//! `[lo, hi)`. A goroutine that runs off its stack faults there before it
//! writes a byte of anything else (Rust's stack probes touch every page of
//! a large frame in order, so no frame jumps over the page), and the
//! SIGSEGV handler reports it, naming the goroutine
//! (`src/signal_unix.rs`).
//!
//! A guarded stack is one anonymous `mmap` of guard + stack
//! (`MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK`: address
//! space only, no swap reserved; pages cost memory when touched), whose
//! first page is then made `PROT_NONE` with `mprotect`. That is
//! [`MAPPINGS_PER_GUARDED_STACK`] = **2 kernel mappings (VMAs) per stack**,
//! and it cannot be fewer with `mprotect`-style guards: Linux merges
//! neighbouring mappings only when their protections match, and guard and
//! stack alternate (`…[guard][stack][guard][stack]…`), so *n* stacks are
//! *n* `PROT_NONE` areas and *n* read-write areas however they are laid
//! out. (`tests/guard.rs` counts them in `/proc/self/maps`.)
//!
//! Linux caps the mappings of a process at `vm.max_map_count` (65,530 by
//! default). The stacks may use all of it but [`MAP_COUNT_RESERVE`]
//! (8,192) mappings, which are left to the rest of the process, so at most
//! [`guarded_stack_limit`]`(max_map_count)` = (max_map_count − 8,192) / 2
//! guarded stacks are live at once: **28,669 under the default limit**
//! (1,095,904 with `vm.max_map_count = 2200000`). A live stack is one that
//! a G holds, running, parked or dead and kept on a free list for reuse.
//! The limit is read from `/proc/sys/vm/max_map_count` when first needed,
//! and again whenever it is reached, so raising the sysctl while the
//! program runs takes effect.
//!
//! When it is reached, [`stackalloc`] fails with
//! [`StackError::GuardedStacksExhausted`], whose message names the limit
//! and the command that raises it: `try_spawn` returns it, `go` and `spawn`
//! panic with it. No stack silently loses its guard.
//!
//! `set_guard_page_budget` can only *lower* the limit (so that a program
//! keeps mappings for other uses, or a test reaches exhaustion quickly); it
//! cannot remove guards, which is why it is safe. It is process-wide
//! because the mapping limit it shares out is.
//!
//! # Unguarded stacks: an `unsafe` opt-in
//!
//! [`stackalloc_unguarded`] (and, for a whole runtime,
//! `Builder::unguarded_stacks` or
//! [`Sched::use_unguarded_stacks`](crate::runtime2::Sched::use_unguarded_stacks))
//! carves stacks from arenas instead: one mapping holds 256 stacks, each
//! with a *soft* guard: the page below `lo`, which must stay zero. The
//! scheduler checks its top [`SOFT_GUARD_CHECK`] bytes every time the G
//! switches out, and the fault handler checks all of it on any fault. That
//! costs 1/256 of a mapping per stack, so a million stacks fit in the
//! default limit, but it gives up the guarantee: an overflow is noticed only
//! at the goroutine's next switch, and a goroutine that recurses without
//! switching runs through its soft guard into the stack below (another
//! goroutine's, or further) and corrupts it before anything notices. Hence
//! `unsafe`: the caller promises that no goroutine overflows its stack.
//!
//! Checking a soft guard costs no memory: the page is never written, and
//! reading an untouched page maps the kernel's shared zero page.
//!
//! # Freestanding
//!
//! Without `std` there is no `mmap`: stacks come from the global allocator
//! with the same soft guard below each, checked at every switch — the only
//! detection. That is part of the bare-metal contract: a freestanding
//! scheduler needs a [`Platform`](crate::platform::Platform), an `unsafe`
//! trait whose implementer accepts it (see its `# Safety`). A kernel with
//! paging can give each stack a hardware guard by unmapping the page below
//! `lo` (the soft guard page) in its own page tables; gokernel does not do
//! it for the embedder.
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

/// The smallest stack [`stackalloc`] hands out: 32 KiB. Rust code formats,
/// unwinds and calls into libc; Go's 2 KiB would not hold it. The deepest
/// thing an ordinary program does is a caught panic printed with
/// `RUST_BACKTRACE=1` (std's hook symbolizes the backtrace on the
/// goroutine's stack): 16 KiB overflowed there, 24 KiB sufficed, 32 KiB
/// leaves room (`tests/panics.rs`:
/// `a_caught_panic_with_rust_backtrace_fits_in_the_minimum_stack`).
pub const STACK_MIN: usize = 32 * 1024;

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
    /// Every guarded stack the process's mapping limit allows is in use
    /// (see the [module docs](self)): `limit` live stacks, under
    /// `vm.max_map_count = max_map_count` (or a lower
    /// `set_guard_page_budget`).
    GuardedStacksExhausted {
        /// How many guarded stacks may be live at once.
        limit: usize,
        /// The `vm.max_map_count` that limit was derived from.
        max_map_count: usize,
    },
}

/// Kernel mappings (VMAs) one guarded stack uses: its `PROT_NONE` guard
/// page and its read-write stack (see the [module docs](self)).
pub const MAPPINGS_PER_GUARDED_STACK: usize = 2;

/// Mappings of `vm.max_map_count` that guarded stacks leave to the rest of
/// the process: the executable and its libraries (a few hundred), every OS
/// thread (stack and guard, alternate signal stack and guard: 4 each, so
/// 1,024 Ms take 4,096), glibc's malloc arenas (up to 8 per CPU, 1–2
/// mappings each), arenas of unguarded stacks, and whatever else the
/// program maps.
pub const MAP_COUNT_RESERVE: usize = 8192;

/// Linux's default `vm.max_map_count`, assumed when
/// `/proc/sys/vm/max_map_count` cannot be read.
pub const DEFAULT_MAX_MAP_COUNT: usize = 65_530;

/// How many guarded stacks may be live at once under a mapping limit of
/// `max_map_count`: `(max_map_count - MAP_COUNT_RESERVE) /
/// MAPPINGS_PER_GUARDED_STACK`; 28,669 for the default 65,530.
pub const fn guarded_stack_limit(max_map_count: usize) -> usize {
    max_map_count.saturating_sub(MAP_COUNT_RESERVE) / MAPPINGS_PER_GUARDED_STACK
}

/// A `vm.max_map_count` worth suggesting to a program that ran out under
/// `current`: four times as much, at least 262,144.
const fn suggested_max_map_count(current: usize) -> usize {
    let four = current.saturating_mul(4);
    if four > 262_144 { four } else { 262_144 }
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
            StackError::GuardedStacksExhausted {
                limit,
                max_map_count,
            } => {
                write!(
                    f,
                    "out of guarded stacks: {limit} live goroutine stacks use "
                )?;
                if limit < guarded_stack_limit(max_map_count) {
                    write!(
                        f,
                        "the budget set with stack::set_guard_page_budget (the process's \
                         memory-mapping limit, vm.max_map_count = {max_map_count}, allows {})",
                        guarded_stack_limit(max_map_count)
                    )?;
                } else {
                    write!(
                        f,
                        "the process's memory-mapping limit (vm.max_map_count = {max_map_count})"
                    )?;
                }
                write!(
                    f,
                    "; raise it with `sysctl -w vm.max_map_count={}` (as root), or opt in to \
                     unguarded stacks with the unsafe Builder::unguarded_stacks",
                    suggested_max_map_count(max_map_count)
                )
            }
        }
    }
}

impl core::error::Error for StackError {}

/// Checks a stack size against [`STACK_MIN`], [`STACK_MAX`] and
/// [`PAGE_SIZE`].
///
/// # Errors
///
/// [`StackError::TooSmall`] or [`StackError::TooLarge`].
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
/// page-aligned (so 16-byte aligned) `hi`. Hosted, the stack has a
/// `PROT_NONE` guard page below `lo`; when the process has as many guarded
/// stacks as its mapping limit allows, this fails with
/// [`StackError::GuardedStacksExhausted`] (see the [module docs](self)).
/// Freestanding, the stack has a soft guard.
///
/// # Errors
///
/// A bad size (as [`check_stack_size`]), no memory, or no guarded stack
/// left ([`StackError::GuardedStacksExhausted`]).
pub fn stackalloc(size: usize) -> Result<StackMem, StackError> {
    check_stack_size(size)?;
    if inject_failure() {
        return Err(StackError::OutOfMemory { size });
    }
    imp::alloc(size)
}

/// Allocates a stack of `size` usable bytes with only a soft guard below
/// it: hosted, a slot of an arena of 256 stacks (1/256 of a kernel mapping
/// per stack, no `guard_page_budget` used); freestanding, the same as
/// [`stackalloc`].
///
/// # Safety
///
/// Nothing stops a goroutine that overflows this stack before its next
/// switch: it writes through the soft guard into the memory below (another
/// goroutine's stack), silently. The caller promises that whatever runs on
/// the stack never uses more than its `size` bytes.
///
/// # Errors
///
/// A bad size (as [`check_stack_size`]) or no memory.
pub unsafe fn stackalloc_unguarded(size: usize) -> Result<StackMem, StackError> {
    check_stack_size(size)?;
    if inject_failure() {
        return Err(StackError::OutOfMemory { size });
    }
    #[cfg(feature = "std")]
    {
        imp::alloc_arena(size)
    }
    #[cfg(not(feature = "std"))]
    {
        imp::alloc(size)
    }
}

impl crate::runtime2::Sched {
    /// Makes this scheduler give the Gs it allocates from now on stacks
    /// without a hardware guard ([`stackalloc_unguarded`]): hosted, arena
    /// stacks with soft guards, which fit a million goroutines under the
    /// default mapping limit. Freestanding stacks have soft guards anyway.
    ///
    /// # Safety
    ///
    /// The caller promises that no goroutine of this scheduler overflows
    /// its stack: an overflow is detected only at the goroutine's next
    /// switch and may first silently corrupt the stacks of other
    /// goroutines (or of an M) below it.
    pub unsafe fn use_unguarded_stacks(&self) {
        self.unguarded_stacks
            .store(true, core::sync::atomic::Ordering::Relaxed);
    }
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
pub use imp::{guard_page_budget, guarded_stacks_live, max_map_count, set_guard_page_budget};

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

    use super::{
        DEFAULT_MAX_MAP_COUNT, Kind, PAGE_SIZE, StackError, StackMem, guarded_stack_limit,
    };
    use crate::runtime2::Stack;

    /// Stacks in one arena mapping.
    const ARENA_SLOTS: usize = 256;

    /// Live guarded stacks (each its own mapping). Changed only by
    /// `alloc` (a compare-and-swap against the limit) and `free`.
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    /// The cap [`set_guard_page_budget`] set (`usize::MAX`: none).
    static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);
    /// `vm.max_map_count` as last read (0: not read yet).
    static MAX_MAP_COUNT: AtomicUsize = AtomicUsize::new(0);

    // Every atomic here is Relaxed: each is a counter or a setting read on
    // its own; no other memory is published through them.

    /// Reads `/proc/sys/vm/max_map_count` (the default 65,530 if it cannot
    /// be read) and remembers it.
    fn read_max_map_count() -> usize {
        let n = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_MAP_COUNT);
        MAX_MAP_COUNT.store(n, Ordering::Relaxed);
        n
    }

    /// The process's mapping limit, `vm.max_map_count`, as last read: the
    /// guarded-stack limit is derived from it (see the
    /// [module docs](super)). Read when first needed and again whenever
    /// the limit is reached.
    pub fn max_map_count() -> usize {
        match MAX_MAP_COUNT.load(Ordering::Relaxed) {
            0 => read_max_map_count(),
            n => n,
        }
    }

    /// How many guarded stacks may be live at once:
    /// [`guarded_stack_limit`]`(`[`max_map_count`]`())`, or less if
    /// [`set_guard_page_budget`] lowered it.
    pub fn guard_page_budget() -> usize {
        guarded_stack_limit(max_map_count()).min(CAP.load(Ordering::Relaxed))
    }

    /// Lowers [`guard_page_budget`] to `n` guarded stacks, process-wide
    /// (`usize::MAX` lifts the cap again): for a program that needs
    /// mappings for other things, or a test that wants to reach
    /// [`StackError::GuardedStacksExhausted`] quickly. It never raises the
    /// budget beyond what `vm.max_map_count` allows (raise the sysctl for
    /// that) and never takes a guard away: stack allocations beyond it fail.
    /// Stacks already live keep theirs.
    pub fn set_guard_page_budget(n: usize) {
        CAP.store(n, Ordering::Relaxed);
    }

    /// Guarded stacks live in the process now (those of dead Gs kept for
    /// reuse included).
    pub fn guarded_stacks_live() -> usize {
        LIVE.load(Ordering::Relaxed)
    }

    /// Takes one guarded stack from the budget, or says why not.
    fn take_budget() -> Result<(), StackError> {
        let mut limit = guard_page_budget();
        let mut reread = false;
        loop {
            if LIVE
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < limit).then_some(n + 1)
                })
                .is_ok()
            {
                return Ok(());
            }
            if reread {
                return Err(StackError::GuardedStacksExhausted {
                    limit,
                    max_map_count: max_map_count(),
                });
            }
            // The sysctl may have been raised since it was read.
            read_max_map_count();
            limit = guard_page_budget();
            reread = true;
        }
    }

    fn map(len: usize) -> *mut u8 {
        // SAFETY: an anonymous private mapping at a kernel-chosen address
        // touches no existing memory. MAP_NORESERVE: no swap is reserved
        // for pages a stack never touches; MAP_STACK: documents the use
        // (and keeps transparent huge pages off it on recent kernels).
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

    /// A guarded stack, within the budget.
    pub(super) fn alloc(size: usize) -> Result<StackMem, StackError> {
        take_budget()?;
        alloc_mapped(size).ok_or_else(|| {
            LIVE.fetch_sub(1, Ordering::Relaxed);
            StackError::OutOfMemory { size }
        })
    }

    /// One `mmap` of guard + stack; the guard page is made `PROT_NONE`:
    /// two mappings.
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

    /// Free slots and the unused tail of the newest arena, for one size.
    struct Pool {
        size: usize,
        free: alloc::vec::Vec<usize>,
        next: usize,
        end: usize,
    }

    static POOLS: spin::Mutex<alloc::vec::Vec<Pool>> = spin::Mutex::new(alloc::vec::Vec::new());

    /// A slot of an arena: a soft guard page, then the stack (see
    /// [`stackalloc_unguarded`](super::stackalloc_unguarded)).
    pub(super) fn alloc_arena(size: usize) -> Result<StackMem, StackError> {
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
                LIVE.fetch_sub(1, Ordering::Relaxed);
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
