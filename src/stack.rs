//! Goroutine stacks: `stackalloc` / `stackfree` (Go's `stack.go`).
//!
//! # What is guaranteed
//!
//! Hosted (the `std` feature), **every stack the safe API makes has a
//! hardware guard**: a page just below its usable part `[lo, hi)` that
//! faults on any access. A goroutine that runs off its stack faults there
//! before it writes a byte of anything else (Rust's stack probes touch
//! every page of a large frame in order, so no frame jumps over the page),
//! and the SIGSEGV handler reports it, naming the goroutine
//! (`src/signal_unix.rs`).
//!
//! The guard is made one of two ways, chosen once per process
//! (hosted: `guard_markers`):
//!
//! - **Guard markers** (Linux 6.13 and later): stacks are carved from
//!   *chunks*, one anonymous mapping of up to [`CHUNK_SLOTS`] slots, each
//!   slot a guard page and a stack (`…[guard][stack][guard][stack]…`),
//!   and every guard page gets `madvise(MADV_GUARD_INSTALL)`: a marker in
//!   the page table that faults on any access, like `PROT_NONE`, but
//!   without a mapping (VMA) of its own. The chunk's guards are installed
//!   with one `process_madvise` call over all of them (one `madvise` per
//!   guard where that call is refused). So a new stack costs a fraction of
//!   a system call and of a mapping, where it cost an `mmap` and an
//!   `mprotect` (two mappings) before, and `vm.max_map_count` no longer
//!   bounds the number of guarded stacks. A freed stack's pages go back to
//!   the kernel (`MADV_DONTNEED`, which keeps the guard marker) and its
//!   slot is reused by the next stack of that size; chunks are never
//!   unmapped (they hold address space, not memory).
//! - **`mprotect`** (older kernels, or `GOKERNEL_STACK_GUARDS=mprotect` in
//!   the environment): a guarded stack is one anonymous `mmap` of guard +
//!   stack whose first page is then made `PROT_NONE` with `mprotect`. That
//!   is [`MAPPINGS_PER_GUARDED_STACK`] = **2 kernel mappings (VMAs) per
//!   stack**, and it cannot be fewer with `mprotect`-style guards: Linux
//!   merges neighbouring mappings only when their protections match, and
//!   guard and stack alternate, so *n* stacks are *n* `PROT_NONE` areas and
//!   *n* read-write areas however they are laid out. (`tests/guard.rs`
//!   counts them in `/proc/self/maps`.)
//!
//! All chunk and mapping memory is `MAP_PRIVATE | MAP_ANONYMOUS |
//! MAP_NORESERVE | MAP_STACK`: address space only, no swap reserved; pages
//! cost memory when touched.
//!
//! With `mprotect` guards, Linux caps the mappings of a process at
//! `vm.max_map_count` (65,530 by default). The stacks may use all of it but
//! [`MAP_COUNT_RESERVE`] (8,192) mappings, which are left to the rest of
//! the process, so at most [`guarded_stack_limit`]`(max_map_count)` =
//! (max_map_count − 8,192) / 2 guarded stacks are live at once: **28,669
//! under the default limit** (1,095,904 with `vm.max_map_count = 2200000`).
//! A live stack is one that a G holds, running, parked or dead and kept on
//! a free list for reuse. The limit is read from
//! `/proc/sys/vm/max_map_count` when first needed, and again whenever it is
//! reached, so raising the sysctl while the program runs takes effect.
//! When it is reached, [`stackalloc`] fails with
//! [`StackError::GuardedStacksExhausted`], whose message names the limit
//! and the command that raises it: `try_spawn` returns it, `go` and `spawn`
//! panic with it. No stack silently loses its guard. With guard markers
//! there is no such limit: stacks are bounded by memory and address space.
//!
//! `set_guard_page_budget` can only *lower* the limit (so that a program
//! keeps mappings for other uses, or a test reaches exhaustion quickly),
//! in either way of guarding; beyond it [`stackalloc`] fails with
//! [`StackError::GuardBudgetExhausted`]. It cannot remove guards, which is
//! why it is safe. It is process-wide because the mapping limit it shares
//! out is.
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
    /// Every guarded stack that `set_guard_page_budget` allows is in use:
    /// `limit` live stacks.
    GuardBudgetExhausted {
        /// How many guarded stacks may be live at once.
        limit: usize,
    },
}

/// Kernel mappings (VMAs) one guarded stack uses when guarded with
/// `mprotect`: its `PROT_NONE` guard page and its read-write stack (see the
/// [module docs](self)). With guard markers (hosted: `guard_markers`) a stack
/// uses 1/[`CHUNK_SLOTS`] of one.
pub const MAPPINGS_PER_GUARDED_STACK: usize = 2;

/// The most stacks (slots of guard page + stack) in one chunk when guard
/// pages are guard markers (hosted: `guard_markers`): one mapping, its guards
/// installed by one system call. Fewer for large stacks: a chunk holds as
/// many as fit in [`CHUNK_BYTES`], at least one.
pub const CHUNK_SLOTS: usize = 64;

/// The address space a chunk of guarded stacks aims at (see
/// [`CHUNK_SLOTS`]): 16 MiB, 64 slots of a [`STACK_MIN`] stack and its
/// guard (2.3 MiB), 63 of a [`STACK_DEFAULT`] one. A chunk's first stack
/// brings in the top pages of all its stacks (252 KiB for 63) and the page
/// tables of its guards; with 4 MiB chunks (15 default stacks) spawning
/// 1,000 parked goroutines with default stacks took 1.08 times as long
/// (10,000: 1.06; docs/performance.md).
pub const CHUNK_BYTES: usize = 16 << 20;

/// Stacks of `size` usable bytes in one chunk: as many slots (guard page +
/// stack) as fit in [`CHUNK_BYTES`], at least 1 and at most
/// [`CHUNK_SLOTS`].
pub const fn chunk_slots(size: usize) -> usize {
    let n = CHUNK_BYTES / (size + PAGE_SIZE);
    if n == 0 {
        1
    } else if n > CHUNK_SLOTS {
        CHUNK_SLOTS
    } else {
        n
    }
}

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
            StackError::GuardBudgetExhausted { limit } => write!(
                f,
                "out of guarded stacks: {limit} live goroutine stacks use the budget set with \
                 stack::set_guard_page_budget; raise it (usize::MAX lifts it), or opt in to \
                 unguarded stacks with the unsafe Builder::unguarded_stacks"
            ),
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
    /// A slot of a chunk; the page at `slot` holds a guard marker.
    #[cfg(feature = "std")]
    Chunk { slot: usize, len: usize },
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
            Kind::Mapped { .. } | Kind::Chunk { .. } => false,
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

    /// A stack for a G of this scheduler: its stack size, without a
    /// hardware guard if it was told to use those
    /// ([`use_unguarded_stacks`](Self::use_unguarded_stacks)).
    pub(crate) fn stackalloc_g(&self) -> Result<StackMem, StackError> {
        if self
            .unguarded_stacks
            .load(core::sync::atomic::Ordering::Relaxed)
        {
            // SAFETY: whoever set unguarded_stacks promised, in
            // use_unguarded_stacks' contract, that no G of self overflows.
            unsafe { stackalloc_unguarded(self.stack_size) }
        } else {
            stackalloc(self.stack_size)
        }
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

/// Frees many stacks at once: hosted, their pages go back to the kernel
/// with one `process_madvise(MADV_DONTNEED)` per [`FREE_BATCH`] stacks
/// and their slots to the pool under one hold of its lock, where dropping
/// each costs a `madvise` (with its TLB flush) and a lock. For the
/// scheduler's bulk frees: `gftrim` and dropping a scheduler. The rest is
/// freed when the batch is dropped.
pub(crate) struct FreeBatch {
    #[cfg(feature = "std")]
    slots: heapless::Vec<(usize, usize, bool), FREE_BATCH>,
}

/// Stacks per [`FreeBatch`] system call (an `iovec` each, 16 bytes, on
/// the caller's stack).
#[cfg(feature = "std")]
pub(crate) const FREE_BATCH: usize = 256;

impl FreeBatch {
    /// An empty batch.
    pub(crate) fn new() -> Self {
        FreeBatch {
            #[cfg(feature = "std")]
            slots: heapless::Vec::new(),
        }
    }

    /// Frees `mem`, now or with the batch.
    pub(crate) fn push(&mut self, mem: StackMem) {
        #[cfg(feature = "std")]
        {
            let (slot, len, guarded) = match mem.kind {
                Kind::Chunk { slot, len } => (slot, len, true),
                Kind::Arena { slot, len } => (slot, len, false),
                Kind::Mapped { .. } => return drop(mem),
            };
            if mem.vg_id != 0 {
                valgrind::stack_deregister(mem.vg_id);
            }
            core::mem::forget(mem);
            if self.slots.push((slot, len, guarded)).is_err() {
                unreachable!("a full batch is flushed before the next push");
            }
            if self.slots.is_full() {
                self.flush();
            }
        }
        #[cfg(not(feature = "std"))]
        drop(mem);
    }

    /// Frees what the batch holds.
    pub(crate) fn flush(&mut self) {
        #[cfg(feature = "std")]
        if !self.slots.is_empty() {
            // SAFETY: every slot came from a StackMem given to `push`,
            // which was forgotten there: nothing else frees or uses it.
            unsafe { imp::free_slots(&self.slots) };
            self.slots.clear();
        }
    }
}

impl Drop for FreeBatch {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(feature = "std")]
pub use imp::{
    guard_markers, guard_page_budget, guarded_stacks_live, max_map_count, set_guard_page_budget,
};

/// Valgrind client requests: telling Valgrind where goroutine stacks are,
/// so that its memory checker treats a jump of the stack pointer between
/// them as a switch of stacks rather than a huge push or pop. Outside
/// Valgrind the request is a handful of no-op instructions.
#[cfg(feature = "std")]
mod valgrind {
    const RUNNING_ON_VALGRIND: usize = 0x1001;
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

    /// `RUNNING_ON_VALGRIND`: true under Valgrind, which does not know
    /// every system call (`process_madvise` among them: it warns and
    /// fails the call), so callers take a plainer way there.
    pub(super) fn running() -> bool {
        use core::sync::atomic::{AtomicU8, Ordering};
        // 0: not asked yet; 1: no; 2: yes.
        static RUNNING: AtomicU8 = AtomicU8::new(0);
        match RUNNING.load(Ordering::Relaxed) {
            0 => {
                let yes = request([RUNNING_ON_VALGRIND, 0, 0, 0, 0, 0], 0) != 0;
                RUNNING.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
                yes
            }
            v => v == 2,
        }
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
    use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

    use super::{
        DEFAULT_MAX_MAP_COUNT, Kind, PAGE_SIZE, StackError, StackMem, chunk_slots,
        guarded_stack_limit,
    };
    use crate::runtime2::Stack;

    /// Stacks in one arena mapping (unguarded stacks).
    const ARENA_SLOTS: usize = 256;

    /// Linux's `MADV_GUARD_INSTALL` (6.13): a guard marker in the page
    /// table of each page of the range; any access faults (SIGSEGV).
    /// `MADV_DONTNEED` keeps it; `munmap` removes it.
    const MADV_GUARD_INSTALL: libc::c_int = 102;

    /// Linux's `MADV_POPULATE_WRITE` (5.14): fault the range in, writable,
    /// now.
    const MADV_POPULATE_WRITE: libc::c_int = 23;

    /// `PIDFD_SELF_THREAD` (Linux 6.15): a pidfd argument naming the
    /// calling thread (so its process) without opening one.
    const PIDFD_SELF_THREAD: libc::c_int = -10000;

    /// Live guarded stacks. Changed only by `alloc` (a compare-and-swap
    /// against the limit) and `free`.
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    /// The cap [`set_guard_page_budget`] set (`usize::MAX`: none).
    static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);
    /// `vm.max_map_count` as last read (0: not read yet).
    static MAX_MAP_COUNT: AtomicUsize = AtomicUsize::new(0);

    /// How guard pages are made: [`UNDECIDED`], [`MARKERS`] or [`MPROTECT`].
    static GUARDS: AtomicU8 = AtomicU8::new(UNDECIDED);
    const UNDECIDED: u8 = 0;
    const MARKERS: u8 = 1;
    const MPROTECT: u8 = 2;

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

    /// The process's mapping limit, `vm.max_map_count`, as last read: with
    /// `mprotect` guards the guarded-stack limit is derived from it (see
    /// the [module docs](super)). Read when first needed and again whenever
    /// the limit is reached.
    pub fn max_map_count() -> usize {
        match MAX_MAP_COUNT.load(Ordering::Relaxed) {
            0 => read_max_map_count(),
            n => n,
        }
    }

    /// True if guarded stacks get their guard pages as guard markers
    /// (`MADV_GUARD_INSTALL`, Linux 6.13 and later), in chunks of up to
    /// [`CHUNK_SLOTS`](super::CHUNK_SLOTS) stacks per mapping; false if
    /// each stack is a mapping of its own with a `PROT_NONE` guard page
    /// (see the [module docs](super)). Decided on the first call, for the
    /// life of the process: by trying a marker on a scratch page, unless
    /// the environment has `GOKERNEL_STACK_GUARDS=mprotect`.
    ///
    /// ```
    /// // Either way, a stack has a hardware guard page below it.
    /// let markers = gokernel::stack::guard_markers();
    /// let stack = gokernel::stack::stackalloc(gokernel::stack::STACK_MIN).unwrap();
    /// assert!(!stack.has_soft_guard());
    /// # let _ = markers;
    /// ```
    pub fn guard_markers() -> bool {
        match GUARDS.load(Ordering::Relaxed) {
            MARKERS => true,
            MPROTECT => false,
            _ => {
                let markers = std::env::var_os("GOKERNEL_STACK_GUARDS")
                    .is_none_or(|v| v != "mprotect")
                    && markers_work();
                GUARDS.store(if markers { MARKERS } else { MPROTECT }, Ordering::Relaxed);
                markers
            }
        }
    }

    /// Tries a guard marker on a scratch page: true if the kernel has them.
    fn markers_work() -> bool {
        let p = map(PAGE_SIZE);
        if p.is_null() {
            return false;
        }
        // SAFETY: the page was just mapped and nothing else uses it.
        let ok = unsafe { libc::madvise(p.cast(), PAGE_SIZE, MADV_GUARD_INSTALL) } == 0;
        // SAFETY: unmapping the scratch page, which nothing uses.
        unsafe { libc::munmap(p.cast(), PAGE_SIZE) };
        ok
    }

    /// How many guarded stacks may be live at once: with `mprotect` guards
    /// [`guarded_stack_limit`]`(`[`max_map_count`]`())`, with guard markers
    /// no limit (`usize::MAX`); in either case no more than
    /// [`set_guard_page_budget`] set.
    pub fn guard_page_budget() -> usize {
        let cap = CAP.load(Ordering::Relaxed);
        if guard_markers() {
            cap
        } else {
            guarded_stack_limit(max_map_count()).min(cap)
        }
    }

    /// Lowers [`guard_page_budget`] to `n` guarded stacks, process-wide
    /// (`usize::MAX` lifts the cap again): for a program that needs
    /// mappings for other things, or a test that wants to reach the limit
    /// quickly. It never raises the budget beyond what `vm.max_map_count`
    /// allows (with `mprotect` guards; raise the sysctl for that) and never
    /// takes a guard away: stack allocations beyond it fail with
    /// [`StackError::GuardBudgetExhausted`]. Stacks already live keep
    /// theirs.
    pub fn set_guard_page_budget(n: usize) {
        CAP.store(n, Ordering::Relaxed);
    }

    /// Guarded stacks live in the process now (those of dead Gs kept for
    /// reuse included).
    pub fn guarded_stacks_live() -> usize {
        LIVE.load(Ordering::Relaxed)
    }

    /// The error for a full budget: the cap's, or the mapping limit's.
    fn exhausted(limit: usize) -> StackError {
        if guard_markers() || limit >= CAP.load(Ordering::Relaxed) {
            StackError::GuardBudgetExhausted { limit }
        } else {
            StackError::GuardedStacksExhausted {
                limit,
                max_map_count: max_map_count(),
            }
        }
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
            if reread || guard_markers() {
                return Err(exhausted(limit));
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
        let mem = if guard_markers() {
            take_slot(size, true).map(|(slot, populate)| {
                populate_tops(slot, size + PAGE_SIZE, populate);
                chunk_stack(slot, size)
            })
        } else {
            alloc_mapped(size)
        };
        mem.ok_or_else(|| {
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

    /// The stack of chunk slot `slot` (its guard marker installed).
    fn chunk_stack(slot: usize, size: usize) -> StackMem {
        let lo = slot + PAGE_SIZE;
        StackMem {
            stack: Stack { lo, hi: lo + size },
            kind: Kind::Chunk {
                slot,
                len: size + PAGE_SIZE,
            },
            vg_id: super::valgrind::stack_register(lo, lo + size),
        }
    }

    /// Gives `advice` for every range of `iov` with one
    /// `process_madvise` on the calling process; whether it covered them
    /// all. False, with nothing done, under Valgrind, which does not know
    /// the call (it warns, and fails it); false too where the kernel
    /// refuses it (before 6.13, or no `PIDFD_SELF_THREAD`) or stops short:
    /// the callers then fall back to a `madvise` per range, or, for a
    /// hint, to nothing.
    ///
    /// # Safety
    /// As `madvise(advice)` on each range: the ranges are this process's
    /// memory, and the advice is harmless to whatever uses them.
    unsafe fn madvise_ranges(iov: &[libc::iovec], advice: libc::c_int) -> bool {
        if super::valgrind::running() {
            return false;
        }
        let want: usize = iov.iter().map(|v| v.iov_len).sum();
        // SAFETY: the contract; the call only reads the iovecs.
        let got = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                PIDFD_SELF_THREAD,
                iov.as_ptr(),
                iov.len(),
                advice,
                0,
            )
        };
        usize::try_from(got).is_ok_and(|g| g == want)
    }

    /// A chunk of `n` slots of `len` bytes, each starting with a guard
    /// marker page: one mapping, and one `process_madvise` over every
    /// guard page (or one `madvise` per guard page where that is refused:
    /// older kernels, no `PIDFD_SELF_THREAD`, or Valgrind). Null if the
    /// system is out of memory or mappings.
    fn map_chunk(len: usize, n: usize) -> *mut u8 {
        let base = map(len * n);
        if base.is_null() {
            return base;
        }
        let guards: alloc::vec::Vec<libc::iovec> = (0..n)
            .map(|i| libc::iovec {
                iov_base: base.wrapping_add(i * len).cast(),
                iov_len: PAGE_SIZE,
            })
            .collect();
        // SAFETY: every range is a page of the mapping just made, which
        // nothing else uses.
        let done = unsafe { madvise_ranges(&guards, MADV_GUARD_INSTALL) };
        if !done {
            // Installing a marker twice is harmless: do every page.
            for g in &guards {
                // SAFETY: as above.
                if unsafe { libc::madvise(g.iov_base, PAGE_SIZE, MADV_GUARD_INSTALL) } != 0 {
                    // Out of memory for page tables: give the chunk back
                    // rather than hand out a stack without its guard.
                    // SAFETY: unmapping the chunk just made, unused.
                    unsafe { libc::munmap(base.cast(), len * n) };
                    return core::ptr::null_mut();
                }
            }
        }
        base
    }

    /// Free slots and the unused tail of the newest region (arena or
    /// chunk), for one size and kind.
    struct Pool {
        size: usize,
        guarded: bool,
        free: alloc::vec::Vec<usize>,
        next: usize,
        end: usize,
    }

    static POOLS: spin::Mutex<alloc::vec::Vec<Pool>> = spin::Mutex::new(alloc::vec::Vec::new());

    /// The pool of slots for stacks of `size` bytes, guarded (chunks) or
    /// not (arenas), made if there is none.
    fn pool(pools: &mut alloc::vec::Vec<Pool>, size: usize, guarded: bool) -> &mut Pool {
        match pools
            .iter()
            .position(|p| p.size == size && p.guarded == guarded)
        {
            Some(i) => &mut pools[i],
            None => {
                pools.push(Pool {
                    size,
                    guarded,
                    free: alloc::vec::Vec::new(),
                    next: 0,
                    end: 0,
                });
                pools.last_mut().expect("just pushed")
            }
        }
    }

    /// Slots of a chunk whose top pages are populated together
    /// ([`populate_tops`]): a whole chunk of `STACK_MIN` stacks. 64 per
    /// call spawned 1,000 parked goroutines in 0.90 of the time 16 per call
    /// took (docs/performance.md); the price is 256 KiB brought in with a
    /// chunk's first stack.
    const POPULATE_BATCH: usize = 64;

    /// A slot for a stack of `size` bytes: a freed one, the next of the
    /// newest region, or the first of a new region (mapped without the
    /// pools' lock held); with the number of slots from it on whose top
    /// pages the caller should populate ([`populate_tops`]): a batch at
    /// every [`POPULATE_BATCH`]th new slot of a chunk, else 0. `None` if
    /// out of memory.
    fn take_slot(size: usize, guarded: bool) -> Option<(usize, usize)> {
        let len = size + PAGE_SIZE;
        let n = if guarded {
            chunk_slots(size)
        } else {
            ARENA_SLOTS
        };
        // The populate batch starting at new slot `i` of a region.
        let batch = |i: usize| {
            if guarded && i.is_multiple_of(POPULATE_BATCH) {
                POPULATE_BATCH.min(n - i)
            } else {
                0
            }
        };
        {
            let mut pools = POOLS.lock();
            let p = pool(&mut pools, size, guarded);
            if let Some(slot) = p.free.pop() {
                return Some((slot, 0));
            }
            if p.next != p.end {
                let slot = p.next;
                p.next += len;
                return Some((slot, batch(n - (p.end - slot) / len)));
            }
        }
        let region = if guarded {
            map_chunk(len, n)
        } else {
            map(len * n)
        };
        if region.is_null() {
            return None;
        }
        let region = region as usize;
        let mut pools = POOLS.lock();
        let p = pool(&mut pools, size, guarded);
        if p.next == p.end {
            p.next = region + len;
            p.end = region + len * n;
            Some((region, batch(0)))
        } else {
            // Another thread mapped a region meanwhile: keep this one's
            // slots as free ones.
            p.free.extend((1..n).map(|i| region + i * len));
            Some((region, 0))
        }
    }

    /// Populates the top page of `count` slots of `len` bytes from `slot`
    /// with one `process_madvise(MADV_POPULATE_WRITE)`: the page a new
    /// goroutine's first frame is written to, which would otherwise take a
    /// page fault per goroutine (about 10 % of the CPU time of spawning
    /// 100,000 at once, measured). Only a hint: if the call fails (an older
    /// kernel), or under Valgrind, the pages fault in as before.
    fn populate_tops(slot: usize, len: usize, count: usize) {
        if count == 0 {
            return;
        }
        let tops: heapless::Vec<libc::iovec, POPULATE_BATCH> = (0..count)
            .map(|i| libc::iovec {
                iov_base: (slot + (i + 1) * len - PAGE_SIZE) as *mut libc::c_void,
                iov_len: PAGE_SIZE,
            })
            .collect();
        // SAFETY: each range is the top page of a slot of a chunk this
        // module mapped. The slots after the caller's may meanwhile have
        // been handed to other threads' stacks; MADV_POPULATE_WRITE
        // changes no byte of any page (a page already present is left as
        // it is, a missing one comes in zero-filled, as a fault would
        // bring it), so that is harmless. A hint: whether it took is moot.
        unsafe { madvise_ranges(&tops, MADV_POPULATE_WRITE) };
    }

    /// A slot of an arena: a soft guard page, then the stack (see
    /// [`stackalloc_unguarded`](super::stackalloc_unguarded)).
    pub(super) fn alloc_arena(size: usize) -> Result<StackMem, StackError> {
        let (slot, _) = take_slot(size, false).ok_or(StackError::OutOfMemory { size })?;
        let lo = slot + PAGE_SIZE;
        Ok(StackMem {
            stack: Stack { lo, hi: lo + size },
            kind: Kind::Arena {
                slot,
                len: size + PAGE_SIZE,
            },
            vg_id: super::valgrind::stack_register(lo, lo + size),
        })
    }

    /// The range of a slot whose pages go back to the kernel when it is
    /// freed: for a chunk slot only the stack's pages (the guard marker
    /// stays); for an arena slot all of it, which also re-arms the soft
    /// guard (it reads as zero again).
    fn slot_pages(slot: usize, len: usize, guarded: bool) -> (usize, usize) {
        if guarded {
            (slot + PAGE_SIZE, len - PAGE_SIZE)
        } else {
            (slot, len)
        }
    }

    /// Gives a slot's pages back to the kernel and the slot to its pool.
    ///
    /// # Safety
    /// The slot must be one of the pool's, unused.
    unsafe fn free_slot(slot: usize, len: usize, guarded: bool) {
        // SAFETY: per the contract.
        unsafe { free_slots(&[(slot, len, guarded)]) }
    }

    /// [`free_slot`] for many: the pages with one
    /// `process_madvise(MADV_DONTNEED)` (Linux 6.13 and later take any
    /// advice for the calling process; older kernels, or a call that did
    /// not cover every range, get a `madvise` per slot, which is harmless
    /// twice), the slots under one hold of the pools' lock.
    ///
    /// # Safety
    /// Every slot must be one of the pools', unused.
    pub(super) unsafe fn free_slots(slots: &[(usize, usize, bool)]) {
        // SAFETY: per the contract.
        let done = slots.len() > 1 && unsafe { dontneed_batch(slots) };
        if !done {
            for &(slot, len, guarded) in slots {
                let (from, n) = slot_pages(slot, len, guarded);
                // SAFETY: per the contract, the slot is ours and unused.
                unsafe { libc::madvise(from as *mut libc::c_void, n, libc::MADV_DONTNEED) };
            }
        }
        let mut pools = POOLS.lock();
        for &(slot, len, guarded) in slots {
            pool(&mut pools, len - PAGE_SIZE, guarded).free.push(slot);
            if guarded {
                LIVE.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// The pages of `slots` back to the kernel with one
    /// `process_madvise(MADV_DONTNEED)`; whether it covered them all. Out
    /// of line: its `iovec`s take 4 KiB of stack, which a single free
    /// (possibly on a goroutine's stack) should not reserve.
    ///
    /// # Safety
    /// As [`free_slots`]; at most [`FREE_BATCH`](super::FREE_BATCH) slots.
    #[inline(never)]
    unsafe fn dontneed_batch(slots: &[(usize, usize, bool)]) -> bool {
        let iov: heapless::Vec<libc::iovec, { super::FREE_BATCH }> = slots
            .iter()
            .map(|&(slot, len, guarded)| {
                let (from, n) = slot_pages(slot, len, guarded);
                libc::iovec {
                    iov_base: from as *mut libc::c_void,
                    iov_len: n,
                }
            })
            .collect();
        // SAFETY: per the contract, the ranges are ours and unused.
        unsafe { madvise_ranges(&iov, libc::MADV_DONTNEED) }
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
            Kind::Chunk { slot, len } => {
                // SAFETY: per the contract (free_slots counts it off LIVE).
                unsafe { free_slot(slot, len, true) };
            }
            Kind::Arena { slot, len } => {
                // SAFETY: per the contract.
                unsafe { free_slot(slot, len, false) };
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
