//! The runtime's data: [`Gobuf`], [`Stack`], [`G`], [`M`], [`P`] and the
//! goroutine status constants (Go's `runtime2.go`).
//!
//! Every struct here is `#[repr(C)]`. Each field that assembly reads or
//! writes has a named offset constant below ([`GOBUF_SP`], [`G_SCHED`],
//! [`M_G0`], …), computed with [`memoffset::offset_of!`] and pinned with
//! [`static_assertions`], so that moving a field either moves the constant
//! with it or fails the build. The switch code in
//! [`asm_amd64`](crate::asm_amd64) takes these constants as `const`
//! operands; no numeric offset appears in any asm string.
//!
//! [`OFFSETS`] lists the same constants as data. `cargo xtask offsets`
//! turns it into `docs/offsets.md`, `docs/offsets.inc` (GNU as) and
//! `docs/offsets.h` (C) for embedders who write their own assembly.

use core::panic::Location;
use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicU32, AtomicU64, Ordering};

use memoffset::offset_of;
use static_assertions::{const_assert, const_assert_eq};

/// A goroutine stack: the memory `[lo, hi)`. `hi` is 16-byte aligned; the
/// stack grows down from it.
///
/// A stack of `lo == hi == 0` is "not known" (g0 on a thread whose stack
/// the runtime did not allocate).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stack {
    /// Lowest usable address (asm: [`STACK_LO`]).
    pub(crate) lo: usize,
    /// One past the highest usable address (asm: [`STACK_HI`]).
    pub(crate) hi: usize,
}

/// The saved context of a G that is not running (Go's `gobuf`).
///
/// Go's ABI has no callee-saved registers, so Go's `gobuf` holds only
/// `sp`, `pc`, `bp`, `g` and `ctxt`. The Rust (System V) ABI has six:
/// rbx, rbp, r12–r15. `mcall` saves them here and `gogo` restores them, so
/// a suspended G's stack holds nothing but its own frames and `pc` is the
/// real return address of the `mcall` (what a traceback wants).
///
/// All fields are read by asm; do not reorder them without running
/// `cargo xtask offsets`. They are private: `gogo` trusts them (it jumps to
/// `pc` on stack `sp`), so only the switch code and the scheduler write
/// them; the getters ([`Gobuf::sp`], [`Gobuf::pc`], …) read them.
///
/// ```compile_fail,E0616
/// let mut buf = gokernel::runtime2::Gobuf::new();
/// buf.pc = 0xdead; // private: only the switch code writes a Gobuf
/// ```
#[repr(C)]
#[derive(Debug)]
pub struct Gobuf {
    /// Stack pointer to resume with (asm: [`GOBUF_SP`]).
    pub(crate) sp: usize,
    /// Address to jump to (asm: [`GOBUF_PC`]).
    pub(crate) pc: usize,
    /// The G this context belongs to; `gogo` installs it as the current G
    /// (asm: [`GOBUF_G`]).
    pub(crate) g: *mut G,
    /// Closure context: `gogo` loads it into rdx. A fresh G's entry
    /// trampoline takes its [`FuncVal`] from there (asm: [`GOBUF_CTXT`]).
    pub(crate) ctxt: usize,
    /// Frame pointer, rbp (asm: [`GOBUF_BP`]).
    pub(crate) bp: usize,
    /// Callee-saved rbx (asm: [`GOBUF_RBX`]).
    pub(crate) rbx: usize,
    /// Callee-saved r12 (asm: [`GOBUF_R12`]).
    pub(crate) r12: usize,
    /// Callee-saved r13 (asm: [`GOBUF_R13`]).
    pub(crate) r13: usize,
    /// Callee-saved r14 (asm: [`GOBUF_R14`]).
    pub(crate) r14: usize,
    /// Callee-saved r15 (asm: [`GOBUF_R15`]).
    pub(crate) r15: usize,
}

impl Stack {
    /// Lowest usable address.
    pub const fn lo(&self) -> usize {
        self.lo
    }

    /// One past the highest usable address.
    pub const fn hi(&self) -> usize {
        self.hi
    }
}

impl Gobuf {
    /// The stack pointer the context resumes with.
    pub const fn sp(&self) -> usize {
        self.sp
    }

    /// The address the context resumes at.
    pub const fn pc(&self) -> usize {
        self.pc
    }

    /// The frame pointer (rbp) the context resumes with.
    pub const fn bp(&self) -> usize {
        self.bp
    }

    /// The G this context belongs to (null for an empty context).
    pub const fn g(&self) -> *mut G {
        self.g
    }

    /// The closure context `gogo` loads into rdx.
    pub const fn ctxt(&self) -> usize {
        self.ctxt
    }

    /// An empty context: `gogo` on it is a fatal error (no G).
    pub const fn new() -> Self {
        Gobuf {
            sp: 0,
            pc: 0,
            g: core::ptr::null_mut(),
            ctxt: 0,
            bp: 0,
            rbx: 0,
            r12: 0,
            r13: 0,
            r14: 0,
            r15: 0,
        }
    }
}

impl Default for Gobuf {
    fn default() -> Self {
        Self::new()
    }
}

/// A function value as the switch code calls it (Go's `funcval`): a code
/// pointer followed, in memory, by whatever the code needs.
///
/// The asm calls `(fv.fn_)(fv)`: rdi holds the `FuncVal`'s own address, so
/// a `#[repr(C)]` struct that starts with a `FuncVal` can recover its other
/// fields from it. [`systemstack`](crate::systemstack) and
/// [`gostartcallfn`](crate::proc::gostartcallfn) build them.
#[repr(C)]
#[derive(Debug)]
pub struct FuncVal {
    /// The code, called with the `FuncVal`'s address in rdi
    /// (asm: [`FUNCVAL_FN`]).
    pub(crate) fn_: unsafe extern "C" fn(*mut FuncVal),
}

/// A goroutine's function, kept in its G (Go keeps a pointer to a
/// `funcval`). A closure of up to [`STARTFN_INLINE`] bytes (aligned to at
/// most 8) is stored in place, a larger one in a `Box`: starting a
/// goroutine whose closure captures a few words does not allocate.
pub(crate) struct StartFn {
    /// Consumes the closure in `buf`: runs it (`true`) or drops it
    /// (`false`). An [`StartOp`] as a pointer, null when there is none;
    /// atomic (relaxed loads and stores, plain moves) so that a goroutine
    /// dump on another thread may ask whether the G has started.
    op: AtomicPtr<()>,
    buf: core::mem::MaybeUninit<[usize; STARTFN_WORDS]>,
}

/// Six words: a closure that captures a few `Arc`s or channels and a
/// value or two (the `spawn-parked` workload's captures five) starts
/// without a `malloc` of its own. With three, such a closure was boxed:
/// 48 B more heap per goroutine, a fresh heap page every 85 spawns on a
/// thread whose heap is still growing (each a page fault, and a glibc
/// `mprotect` to extend the arena), and the `free` at exit; the G grew 24
/// B for it. Measured on 1,000 goroutines spawned to park, fresh process,
/// 1 P: the spawning thread's CPU time per goroutine fell 3.5 % and 11 %
/// in two interleaved runs of 15 (docs/performance.md).
const STARTFN_WORDS: usize = 6;

/// What [`StartFn`]'s `op` points to.
type StartOp = unsafe fn(*mut u8, bool);

/// The largest closure (in bytes) a G stores without allocating.
pub const STARTFN_INLINE: usize = STARTFN_WORDS * core::mem::size_of::<usize>();

impl StartFn {
    /// No function.
    pub(crate) const fn empty() -> Self {
        StartFn {
            op: AtomicPtr::new(core::ptr::null_mut()),
            buf: core::mem::MaybeUninit::uninit(),
        }
    }

    /// Stores `f`, dropping any function stored before.
    #[inline(always)]
    pub(crate) fn set<F: FnOnce() + Send + 'static>(&mut self, f: F) {
        self.clear();
        let fits = core::mem::size_of::<F>() <= STARTFN_INLINE
            && core::mem::align_of::<F>() <= core::mem::align_of::<usize>();
        if fits {
            // SAFETY: F fits the buffer in size and alignment; `op` now
            // owns the value and reads it out exactly once.
            unsafe { self.buf.as_mut_ptr().cast::<F>().write(f) };
            self.set_op(startfn_inline::<F>);
        } else {
            let b = alloc::boxed::Box::new(f);
            // SAFETY: a Box is one word; `op` owns it as above.
            unsafe {
                self.buf
                    .as_mut_ptr()
                    .cast::<alloc::boxed::Box<F>>()
                    .write(b)
            };
            self.set_op(startfn_boxed::<F>);
        }
    }

    /// Takes the function out and runs it; false if there was none. If it
    /// panics, the function is gone all the same.
    pub(crate) fn run(&mut self) -> bool {
        match self.take_op() {
            // SAFETY: `op` matches what `set` stored, and was taken, so the
            // value is consumed once.
            Some(op) => unsafe {
                op(self.buf.as_mut_ptr().cast(), true);
                true
            },
            None => false,
        }
    }

    /// Whether a function is stored (the G has not started yet).
    pub(crate) fn is_set(&self) -> bool {
        !self.op.load(Ordering::Relaxed).is_null()
    }

    fn set_op(&mut self, op: StartOp) {
        // Relaxed: the store that publishes the G (its status, or the
        // queue it goes on) orders it for the M that runs it; a dump only
        // asks whether it is set.
        self.op.store(op as *mut (), Ordering::Relaxed);
    }

    /// The `op`, now taken: a load and a store, no read-modify-write (only
    /// the G's owner writes it).
    fn take_op(&mut self) -> Option<StartOp> {
        let p = self.op.load(Ordering::Relaxed);
        if p.is_null() {
            return None;
        }
        self.op.store(core::ptr::null_mut(), Ordering::Relaxed);
        // SAFETY: a non-null `op` was stored by `set_op` from a StartOp.
        Some(unsafe { core::mem::transmute::<*mut (), StartOp>(p) })
    }

    /// Drops the function, if any, without running it.
    pub(crate) fn clear(&mut self) {
        if let Some(op) = self.take_op() {
            // SAFETY: as in `run`.
            unsafe { op(self.buf.as_mut_ptr().cast(), false) };
        }
    }
}

impl Drop for StartFn {
    fn drop(&mut self) {
        self.clear();
    }
}

/// [`StartFn`]'s `op` for a closure stored in place.
///
/// # Safety
///
/// `p` holds a live `F`, which this consumes.
unsafe fn startfn_inline<F: FnOnce()>(p: *mut u8, call: bool) {
    // SAFETY: the contract.
    let f = unsafe { p.cast::<F>().read() };
    if call {
        f();
    }
}

/// [`StartFn`]'s `op` for a boxed closure.
///
/// # Safety
///
/// `p` holds a live `Box<F>`, which this consumes.
unsafe fn startfn_boxed<F: FnOnce()>(p: *mut u8, call: bool) {
    // SAFETY: the contract.
    let f = unsafe { p.cast::<alloc::boxed::Box<F>>().read() };
    if call {
        f();
    }
}

/// Why a goroutine is parked (Go's `waitReason`), under Go's names, so
/// that dumps read the same. `gopark` records it with the time; a
/// goroutine dump ([`Dump`](crate::traceback::Dump)) and
/// [`Stats::waiting_by_reason`](crate::proc::Stats::waiting_by_reason)
/// show it.
///
/// ```
/// use gokernel::runtime2::WaitReason;
/// assert_eq!(WaitReason::ChanReceive.to_string(), "chan receive");
/// assert_eq!(WaitReason::ALL.len(), WaitReason::COUNT);
/// ```
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WaitReason {
    /// No reason recorded (Go's `waitReasonZero`): a G parked by a direct
    /// caller of `gopark` that gave none.
    Zero = 0,
    /// A channel receive (`recv`, `select!` with one receive case).
    ChanReceive,
    /// A channel send.
    ChanSend,
    /// A `select!` with several cases.
    Select,
    /// A `select!` with no cases: parked for good.
    SelectNoCases,
    /// [`sleep`](crate::time::sleep).
    Sleep,
    /// [`sync::Mutex::lock`](crate::sync::Mutex::lock).
    SyncMutexLock,
    /// [`sync::WaitGroup::wait`](crate::sync::WaitGroup::wait).
    SyncWaitGroupWait,
    /// [`sync::Once::call_once`](crate::sync::Once::call_once), while
    /// another goroutine runs the function.
    SyncOnce,
    /// A `JoinHandle::join` of an unfinished goroutine.
    Join,
    /// `park` (woken by `Goroutine::unpark`).
    Park,
    /// A blocking system call made off its P.
    Syscall,
    /// Waiting for a file descriptor to be ready (the netpoller).
    IoWait,
    /// [`IrqEvent::wait`](crate::intr::IrqEvent::wait): waiting for an
    /// interrupt handler's signal.
    Interrupt,
}

impl WaitReason {
    /// Every reason, in `repr` order.
    pub const ALL: [WaitReason; 14] = [
        WaitReason::Zero,
        WaitReason::ChanReceive,
        WaitReason::ChanSend,
        WaitReason::Select,
        WaitReason::SelectNoCases,
        WaitReason::Sleep,
        WaitReason::SyncMutexLock,
        WaitReason::SyncWaitGroupWait,
        WaitReason::SyncOnce,
        WaitReason::Join,
        WaitReason::Park,
        WaitReason::Syscall,
        WaitReason::IoWait,
        WaitReason::Interrupt,
    ];

    /// How many reasons there are.
    pub const COUNT: usize = Self::ALL.len();

    /// Go's text for the reason (`""` for [`Zero`](Self::Zero)).
    pub const fn as_str(self) -> &'static str {
        match self {
            WaitReason::Zero => "",
            WaitReason::ChanReceive => "chan receive",
            WaitReason::ChanSend => "chan send",
            WaitReason::Select => "select",
            WaitReason::SelectNoCases => "select (no cases)",
            WaitReason::Sleep => "sleep",
            WaitReason::SyncMutexLock => "sync.Mutex.Lock",
            WaitReason::SyncWaitGroupWait => "sync.WaitGroup.Wait",
            WaitReason::SyncOnce => "sync.Once",
            WaitReason::Join => "join",
            WaitReason::Park => "park",
            WaitReason::Syscall => "syscall",
            WaitReason::IoWait => "IO wait",
            WaitReason::Interrupt => "interrupt wait",
        }
    }

    /// The reason stored as `r` (an unknown value reads as `Zero`).
    pub(crate) fn from_u8(r: u8) -> WaitReason {
        Self::ALL
            .get(usize::from(r))
            .copied()
            .unwrap_or(WaitReason::Zero)
    }
}

// `ALL` is in `repr` order, so `from_u8` inverts `as u8`.
const _: () = {
    let mut i = 0;
    while i < WaitReason::COUNT {
        assert!(WaitReason::ALL[i] as usize == i);
        i += 1;
    }
};

impl core::fmt::Display for WaitReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Goroutine status (`G::atomicstatus`). Go's values, so that dumps read
/// the same.
pub mod status {
    /// Just allocated by `malg`, not yet started. Nobody runs it; it is on
    /// no queue. Its stack is owned by whoever holds the G.
    pub const IDLE: u32 = 0;
    /// On a run queue (or about to be put on one), not running. Its stack
    /// holds only its own frames; `sched` says where to resume.
    pub const RUNNABLE: u32 = 1;
    /// Running on an M (`m.curg == g`, `g.m == m`): the M owns its stack.
    pub const RUNNING: u32 = 2;
    /// In a blocking call (`entersyscall` … `exitsyscall`, see
    /// [`crate::syscall`]): still its M's `curg`, running on its own stack,
    /// but its M holds no P, so it runs no gokernel code that needs one.
    /// (A wait reason "syscall" names this status in dumps.)
    pub const SYSCALL: u32 = 3;
    /// Parked: on no run queue; whoever will `ready` it owns the G.
    /// `sched` says where to resume.
    pub const WAITING: u32 = 4;
    /// Finished (or never used): its stack holds nothing live and may be
    /// reused by the next G; it is on a free list or being freed.
    pub const DEAD: u32 = 6;

    /// Go's name for a status, for messages.
    pub const fn name(s: u32) -> &'static str {
        match s {
            IDLE => "idle",
            RUNNABLE => "runnable",
            RUNNING => "running",
            SYSCALL => "syscall",
            WAITING => "waiting",
            DEAD => "dead",
            _ => "unknown",
        }
    }
}

/// A goroutine.
///
/// The first fields are read by asm (offsets [`G_STACK`], [`G_SCHED`],
/// [`G_M`]); the rest are Rust's. All are private: the switch code trusts
/// `stack`, `sched` and `m`, and the scheduler everything else, so safe
/// code reads them through getters ([`G::stack`], [`G::sched`], [`G::m`],
/// [`G::goid`], [`G::readgstatus`]) and cannot break them.
///
/// ```compile_fail,E0616
/// let mut g = gokernel::proc::malg(64 * 1024).unwrap();
/// g.stack = Default::default(); // private: the stack `g` owns and frees
/// ```
#[repr(C)]
pub struct G {
    /// The stack `[lo, hi)` this G runs on (asm: [`G_STACK`]).
    pub(crate) stack: Stack,
    /// Where to resume this G (asm: [`G_SCHED`]).
    pub(crate) sched: Gobuf,
    /// The M running this G, or null (asm: [`G_M`]).
    pub(crate) m: *mut M,
    /// Goroutine id; g0s have id 0 (asm: [`G_GOID`], read by tools).
    /// Atomic (relaxed; a plain `u64` in memory) so that a goroutine dump
    /// may read it while the G is reused.
    pub(crate) goid: AtomicU64,
    /// A [`status`] value.
    pub(crate) atomicstatus: AtomicU32,
    /// The function a fresh G runs: [`gostart`](crate::asm_amd64::gostart)
    /// calls it through `sched.ctxt`, which points at `startfv`.
    pub(crate) startfv: FuncVal,
    /// The closure behind `startfv` (taken when the G starts).
    pub(crate) startfn: StartFn,
    /// The stack memory this G owns, freed when the G is dropped. `None` for
    /// a g0 that runs on its thread's own stack, and for a G that has no
    /// stack yet or any more (`stack` is then `[0, 0)`): a goroutine spawned
    /// when no dead G had one gets it when it first runs
    /// ([`lazystack`](crate::lazystack)).
    pub(crate) stackmem: Option<crate::stack::StackMem>,
    /// Next G on whatever list this G is on: the global run queue or a free
    /// list. Owned by the holder of that list.
    pub(crate) schedlink: *mut G,
    /// The scheduler this G belongs to (null for Gs run on a bare M).
    pub(crate) rt: *const Sched,
    /// Park/unpark state shared with handles to this G, made on first use
    /// and dropped when the G exits.
    pub(crate) parker: Option<alloc::sync::Arc<crate::proc::Parker>>,
    /// This G's index in `Sched::allgs` (scheduler Gs only).
    pub(crate) allg_index: usize,
    /// While parked on a channel or sync object: its waiter, whose sudogs
    /// a dropped runtime takes off their queues (Go's `g.waiting`).
    pub(crate) waiting: *const crate::sema::Waiter,
    /// While waiting on the network poller: the slot of the `PollDesc` it
    /// waits in, which a dropped runtime takes it out of if it never
    /// resumes (`netpoll::netpollabandon`). Written only by the G itself
    /// (and by that drop).
    pub(crate) pollslot: *const core::sync::atomic::AtomicUsize,
    /// The M this G is locked to by
    /// [`lock_os_thread`](crate::proc::lock_os_thread), or null (Go's
    /// `lockedm`). Written by the G itself while it runs on that M (and by
    /// `goexit0` on the M's g0); read by whichever M takes the G off a run
    /// queue, which the queue's release/acquire orders after the write.
    pub(crate) lockedm: *mut M,
    /// The M this G must run on, or null: it may run on any M (Go has no
    /// such field). Set by `execute` when a G first runs on a scheduler
    /// that binds started Gs (the default: see [`crate::bound`]), or by
    /// `lock_os_thread`; written only by the G's own M, before the G can
    /// be seen parked, and cleared when it exits.
    pub(crate) boundm: *mut M,
    /// What the teardown of a stopping scheduler wants of this G at its
    /// parks (`teardown::FORCE_*`). Written by the G's own M while the G
    /// is not running, and by the G itself.
    pub(crate) force: u8,
    /// Why this G last parked: a [`WaitReason`] (Go's `waitreason`), set
    /// by `gopark`; meaningful while the status is [`status::WAITING`].
    /// Atomics (relaxed), like `waitsince` and `spawn_site`, because
    /// dumps read them from any thread while the G runs.
    pub(crate) waitreason: AtomicU8,
    /// When this G last parked, in CPU ticks (`traceback::cputicks`, the
    /// TSC: a plain instruction, where `nanotime` costs a vDSO call on
    /// every park; dumps convert). Go's `waitsince`.
    pub(crate) waitsince: AtomicU64,
    /// Where the `go` / `spawn` that made this G was called (Go's `gopc`),
    /// or null: for dumps, deadlock reports and stall reports.
    pub(crate) spawn_site: AtomicPtr<Location<'static>>,
    /// Timer-interrupt preemption: the pending flag and rip, the
    /// `PreemptGuard` count ([`crate::preempt`]; asm reads its `pc`).
    pub(crate) preempt: crate::preempt::GPreempt,
}

impl G {
    /// The stack `[lo, hi)` this G runs on (`lo == hi == 0` for a g0 on
    /// its thread's own stack, and for a goroutine that has not started and
    /// gets its stack when it first runs).
    pub fn stack(&self) -> Stack {
        self.stack
    }

    /// Where this G resumes (what [`gogo`](crate::asm_amd64::gogo) takes).
    pub fn sched(&self) -> &Gobuf {
        &self.sched
    }

    /// The M running this G, or null.
    pub fn m(&self) -> *mut M {
        self.m
    }

    /// The goroutine id (0 for g0s and for Gs not given one yet).
    pub fn goid(&self) -> u64 {
        self.goid.load(Ordering::Relaxed)
    }

    /// Why this G is parked, if it is ([`status::WAITING`]).
    pub fn wait_reason(&self) -> Option<WaitReason> {
        if self.readgstatus() != status::WAITING {
            return None;
        }
        Some(WaitReason::from_u8(self.waitreason.load(Ordering::Relaxed)))
    }

    /// Where the `go` / `spawn` that made this G was called (Go's
    /// `created by`), if it was made by one.
    pub fn spawn_site(&self) -> Option<&'static Location<'static>> {
        // SAFETY: only ever set from `Location::caller()`, a `'static`
        // reference, or null.
        unsafe { self.spawn_site.load(Ordering::Relaxed).as_ref() }
    }

    /// Where the G was started: the source location of the `go`, `spawn`
    /// or `Sched::go` call that made it (Go's `gopc`); `None` for a G not
    /// made by a scheduler.
    ///
    /// ```
    /// # #[cfg(feature = "std")] {
    /// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
    /// let (at, line) = rt
    ///     .block_on(|| {
    ///         let task = || {
    ///             // SAFETY: the running goroutine's own G.
    ///             let g = unsafe { &*gokernel::getg() };
    ///             g.spawn_location().unwrap()
    ///         };
    ///         let (h, line) = (gokernel::spawn(task), line!());
    ///         (h.join().unwrap(), line)
    ///     })
    ///     .unwrap();
    /// assert_eq!((at.file(), at.line()), (file!(), line));
    /// # }
    /// ```
    pub fn spawn_location(&self) -> Option<&'static core::panic::Location<'static>> {
        let site = self.spawn_site.load(Ordering::Relaxed);
        // SAFETY: null or a `&'static Location` stored by newproc1.
        unsafe { site.as_ref() }
    }

    /// Gives this G an id (a G made by [`malg`](crate::proc::malg) has
    /// none; the scheduler gives its own Gs theirs). Ids only name Gs in
    /// messages, traces and handles; nothing relies on them being unique.
    pub fn set_goid(&mut self, goid: u64) {
        *self.goid.get_mut() = goid;
    }

    /// This G's status (acquire: pairs with the release in
    /// [`G::casstatus`] so a G seen as `RUNNABLE` has its `sched` visible).
    pub fn readgstatus(&self) -> u32 {
        self.atomicstatus.load(Ordering::Acquire)
    }

    /// Whether this G started and has not finished: its stack holds live
    /// frames (a runtime's teardown unwinds such a G, or leaks its stack).
    pub(crate) fn started_unfinished(&self) -> bool {
        let st = self.readgstatus();
        st != status::DEAD && st != status::IDLE && !self.startfn.is_set()
    }

    /// Sets the status (release: publishes `sched` and everything written
    /// before the change to whoever reads the new status).
    ///
    /// A plain release store, not a swap: no locked instruction. The old
    /// value only feeds the debug check, and the caller is the G's one
    /// owner at this moment (its running M; or its one waker, made so by
    /// the wait it parked on), which it became through an operation that
    /// already synchronizes with the previous owner (a run queue's lock or
    /// acquire CAS, a `Parker`'s swap, a channel's lock, an inbox's lock):
    /// a swap's acquire half would add nothing. Nor did the swap guard
    /// against another writer (it writes whatever it reads): the status
    /// has one writer at a time, its owner (teardown claims Gs with a CAS
    /// after its barrier). Readers of the status (`readgstatus`, the stats,
    /// `bound::locked_runnable`, after `readylocked`'s SeqCst fence) pair
    /// with the release.
    ///
    /// # Safety
    ///
    /// The caller owns the G's status now, as above: a G of a scheduler
    /// has its status changed only by the runtime (a G made by
    /// [`malg`](crate::proc::malg) and run by hand is its driver's), and the
    /// new status is true. The runtime trusts it with memory: a parked G
    /// marked dead, say, is not unwound when its runtime is dropped, and
    /// its stack is freed while a channel's wait queue still points into
    /// it. So safe code cannot call it:
    ///
    /// ```compile_fail,E0133
    /// use gokernel::runtime2::status;
    /// let g = gokernel::proc::malg(64 * 1024).unwrap();
    /// g.casstatus(status::IDLE, status::DEAD); // unsafe
    /// ```
    pub unsafe fn casstatus(&self, old: u32, new: u32) {
        #[cfg(debug_assertions)]
        {
            let prev = self.atomicstatus.load(Ordering::Relaxed);
            debug_assert_eq!(
                prev,
                old,
                "goroutine {}: status was {}, expected {}",
                self.goid(),
                status::name(prev),
                status::name(old)
            );
        }
        #[cfg(not(debug_assertions))]
        let _ = old;
        self.atomicstatus.store(new, Ordering::Release);
    }
}

impl core::fmt::Debug for G {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("G")
            .field("goid", &self.goid())
            .field("status", &status::name(self.readgstatus()))
            .field("stack", &self.stack)
            .field("sched", &self.sched)
            .finish_non_exhaustive()
    }
}

/// A worker: an OS thread (hosted) or a CPU (bare metal).
///
/// The first fields are read by asm (offsets [`M_G0`], [`M_CURG`],
/// [`M_GSIGNAL`]). All fields are private: an M owns its g0 (dropping the
/// M frees it) and the switch code trusts `g0`, `curg` and `gsignal`, so
/// safe code only reads them ([`M::g0`], [`M::curg`], …).
///
/// ```compile_fail,E0616
/// let mut m = gokernel::runtime2::M::new(1);
/// m.g0 = core::ptr::null_mut(); // private: Drop for M frees g0
/// ```
///
/// ```compile_fail,E0616
/// use gokernel::runtime2::M;
/// let (mut a, b) = (M::new(1), M::new(2));
/// a.g0 = b.g0; // private: two Ms owning one g0 would free it twice
/// ```
#[repr(C)]
pub struct M {
    /// The scheduling G: its stack is this M's system stack
    /// (asm: [`M_G0`]).
    pub(crate) g0: *mut G,
    /// The user G this M is running, or null (asm: [`M_CURG`]).
    pub(crate) curg: *mut G,
    /// The G whose stack signal handlers run on, or null. `systemstack`
    /// from it runs the function directly (asm: [`M_GSIGNAL`]).
    pub(crate) gsignal: *mut G,
    /// The P this M holds, or null.
    pub(crate) p: *mut P,
    /// M id, for messages.
    pub(crate) id: i64,
    /// The scheduler this M works for; null for a bare M started with
    /// [`mstart`](crate::proc::mstart) alone.
    pub(crate) rt: *const Sched,
    /// The P to acquire when woken from `stopm` (null: exit).
    pub(crate) nextp: *mut P,
    /// True while the M is looking for work without having found any
    /// (counted in `Sched::nmspinning`).
    pub(crate) spinning: bool,
    /// Where `stopm` sleeps until `startm` hands it a P.
    pub(crate) park: crate::lock_futex::Note,
    /// Next M on the idle list (`Sched::midle`), under the scheduler lock.
    pub(crate) schedlink: *mut M,
    /// State of this M's random numbers (victim order for stealing).
    pub(crate) fastrand: u64,
    /// `gopark`'s unlock function, run on g0 by `park_m`.
    pub(crate) waitunlockf: Option<unsafe fn(*mut G, *mut ()) -> bool>,
    /// The argument of `waitunlockf`.
    pub(crate) waitlock: *mut (),
    /// The G locked to this M, or null (Go's `lockedg`): the M runs only
    /// it, and sleeps in `stoplockedm` while it cannot run. Owner only.
    pub(crate) lockedg: *mut G,
    /// [`lock_os_thread`](crate::proc::lock_os_thread) calls not yet undone
    /// by [`unlock_os_thread`](crate::proc::unlock_os_thread) (Go's
    /// `lockedExt`). Owner only.
    pub(crate) lockedext: u32,
    /// True while this M sleeps in `stoplockedm` and nobody has woken it
    /// yet; under [`Sched::lock`], like every wake-up of a locked M.
    pub(crate) lockedsleep: bool,
    /// This M's own run queue: started Gs bound to it (see
    /// [`crate::bound`]) made runnable on this M. `boundnext` jumps the
    /// queue as a P's `runnext` does. Owner (this M's thread) only.
    pub(crate) boundnext: *mut G,
    /// See `boundnext`.
    pub(crate) boundq: GQueue,
    /// Gs bound to this M made runnable by other threads; moved to
    /// `boundq` by the M itself.
    pub(crate) inbox: spin::Mutex<GQueue>,
    /// Length of `inbox`, readable without its lock (SeqCst: pairs with
    /// `sleeping`, see [`crate::bound`]).
    pub(crate) ninbox: AtomicU32,
    /// Whether, and how, this M sleeps without a P: one of
    /// [`crate::bound`]'s `AWAKE`, `IDLE`, `LOCKED`, `TIMER`. Written by the
    /// M itself; read by wakers of its bound Gs.
    pub(crate) sleeping: AtomicU32,
    /// On `SchedLocked::midle`; under [`Sched::lock`].
    pub(crate) onmidle: bool,
    /// Bind the Gs this M starts to it (`!Sched::migrate`), copied here
    /// so `execute` need not read the scheduler.
    pub(crate) bindg: bool,
    /// Gave its P away (`bound::handoff_wanted`) with bound Gs of its own
    /// queued, and neither holds a P again nor waits on `mwantp` yet:
    /// `checkdead` counts it as at work. Under [`Sched::lock`].
    pub(crate) handoffwork: bool,
    /// Gs bound to this M that have not exited (relaxed: a count for
    /// choosing an M with none, and for stats). Written only on this M's
    /// own thread ([`M::nbound_add`]).
    pub(crate) nbound: AtomicU32,
    /// When this M last acquired a P (`Platform::nanotime`), for handing
    /// the P to an M waiting for one only after a time slice.
    pub(crate) pwhen: u64,
    /// In the scheduler's teardown (`teardown::mexit`): past the barrier,
    /// unwinding its goroutines. Owner only.
    pub(crate) tornup: bool,
    /// The P this M held when its G entered a call (`entersyscall`), which
    /// `exitsyscall` tries to take back first (Go's `oldp`). Owner only.
    pub(crate) oldp: *mut P,
    /// True while this M's G is in a call (`entersyscall` …
    /// `exitsyscall`): `checkdead` counts it as running. Written by the M
    /// (cleared under [`Sched::lock`] once the G has a P or waits for one).
    pub(crate) insyscall: core::sync::atomic::AtomicBool,
    /// Hosted: the M's thread id (`gettid`), for the stall detector's
    /// signal; 0 until the thread starts.
    pub(crate) procid: core::sync::atomic::AtomicI32,
    /// The execution trace's state of this M (`crate::trace`).
    pub(crate) trace: crate::trace::MTrace,
}

/// A processor token: an M must hold one to run user Gs. There are `procs`
/// of them (Go's GOMAXPROCS). No asm reads a P. Its fields are the
/// scheduler's (private); [`P::id`] and [`P::m`] read the two that name it.
#[repr(C)]
pub struct P {
    /// P id, `0..procs`.
    pub(crate) id: i32,
    /// The M holding this P, or null (idle P). Written by the M that takes
    /// or releases it; atomic so that sysmon can read it.
    pub(crate) m: core::sync::atomic::AtomicPtr<M>,
    /// Next P on the idle list (`Sched::pidle`), under the scheduler lock.
    pub(crate) link: *mut P,
    /// [`PIDLE`], [`PRUNNING`] or [`PSYSCALL`] (Go's `p.status`): sysmon
    /// retakes a P in `PSYSCALL` by a compare-and-swap, which its M's
    /// `exitsyscall` races with (see [`crate::syscall`]).
    pub(crate) status: AtomicU32,
    /// Incremented on every scheduler call that starts a new time slice;
    /// every 61st looks at the global queue first. Written by the owner
    /// only (a relaxed load and store); sysmon reads it to time slices.
    pub(crate) schedtick: AtomicU32,
    /// Consecutive Gs run from `runnext` (inheriting the time slice); at
    /// [`RUNNEXT_LIMIT`] the chain is demoted behind the queues even if no
    /// sysmon watches this scheduler. Owner only.
    pub(crate) runnext_streak: u32,
    /// Incremented by every `entersyscall` on this P (owner only); sysmon
    /// reads it to tell one long call from many short ones.
    pub(crate) syscalltick: AtomicU32,
    /// Set by sysmon when the current time slice has lasted
    /// [`FORCE_PREEMPT_NS`](crate::sysmon::FORCE_PREEMPT_NS): at its next
    /// scheduling point the P ends the `runnext` chain (Go's `preempt`,
    /// without the asynchronous part). Cleared by the owner.
    pub(crate) preempt: core::sync::atomic::AtomicBool,
    /// The local run queue: a ring of 256 and `runnext`.
    pub(crate) runq: crate::runq::Runq<G>,
    /// Dead Gs with stacks, for reuse (linked by `schedlink`). Owner only.
    pub(crate) gfree: *mut G,
    /// Length of `gfree`.
    pub(crate) gfreecnt: u32,
    /// Dead Gs without stacks (Go's `gFree.noStack`), for spawns that find
    /// no dead G with one (linked by `schedlink`; see
    /// [`lazystack`](crate::lazystack)). Owner only.
    pub(crate) gfree_nostack: *mut G,
    /// Length of `gfree_nostack`.
    pub(crate) gfree_nostackcnt: u32,
    /// Goroutine ids this P hands out next, `goidcache..goidcacheend`,
    /// taken from the global generator [`GOIDCACHE_BATCH`] at a time (Go's
    /// `p.goidcache`): one locked `fetch_add` per batch, not per spawn.
    /// Owner only.
    pub(crate) goidcache: u64,
    pub(crate) goidcacheend: u64,
    /// Counters for [`stats`](crate::proc::PStats).
    pub(crate) stats: PCounters,
    /// This P's timers: a heap under its own lock, and the earliest
    /// deadline readable without it (Go's `p.timers`, `p.timer0When`).
    /// Any M may add to it or run its expired timers.
    pub(crate) timers: crate::time::Timers,
    /// This P's execution-trace buffer position (owner only).
    pub(crate) trace: crate::trace::PTrace,
}

impl M {
    /// Adds `delta` to [`nbound`](Self::nbound): a relaxed load and store,
    /// no locked instruction. Only the M's owner writes it: its own thread
    /// (a bound G starts, locks, unlocks and exits on its M), or, for an
    /// idle M, the one that took it off the idle list (`bound::lockfresh`,
    /// before the wake-up that hands the M over); so no change is lost.
    /// Readers take a relaxed snapshot of an idle M, ordered by the idle
    /// list's lock.
    #[inline]
    pub(crate) fn nbound_add(&self, delta: i32) {
        self.nbound.store(
            self.nbound
                .load(Ordering::Relaxed)
                .wrapping_add_signed(delta),
            Ordering::Relaxed,
        );
    }

    /// The scheduling G, whose stack is this M's system stack. Never null
    /// for an M made by [`M::new`]; the M owns it.
    pub fn g0(&self) -> *mut G {
        self.g0
    }

    /// The user G this M is running, or null.
    pub fn curg(&self) -> *mut G {
        self.curg
    }

    /// The G signal handlers run on, or null.
    pub fn gsignal(&self) -> *mut G {
        self.gsignal
    }

    /// The P this M holds, or null.
    pub fn p(&self) -> *mut P {
        self.p
    }

    /// The M id (for messages).
    pub fn id(&self) -> i64 {
        self.id
    }
}

impl P {
    /// The P id, `0..procs`.
    pub fn id(&self) -> i32 {
        self.id
    }

    /// The M holding this P, or null (idle P).
    pub fn m(&self) -> *mut M {
        self.m.load(Ordering::Relaxed)
    }
}

/// How many Gs in a row may take `runnext` (and so inherit the time slice)
/// before `runnext` has to queue behind the rest: the backstop for a
/// scheduler no sysmon watches (a kernel that does not call
/// [`sysmon_tick`](crate::sysmon::sysmon_tick)). With sysmon the bound is
/// the 10 ms time slice ([`FORCE_PREEMPT_NS`](crate::sysmon::FORCE_PREEMPT_NS)),
/// which a chain of quick hand-offs reaches first: at 64, as this was
/// before sysmon, a chain of 1 µs hand-offs got 1,000 times less CPU than
/// a chain of 1 ms ones (Go's `TestPingPongHog`).
pub const RUNNEXT_LIMIT: u32 = 4096;

/// `P::status`: on the idle list (Go's `_Pidle`).
pub const PIDLE: u32 = 0;
/// `P::status`: held by an M running Gs or looking for them (`_Prunning`).
pub const PRUNNING: u32 = 1;
/// `P::status`: its M's G is in a call and may be away for long; sysmon
/// may take the P for another M (`_Psyscall`).
pub const PSYSCALL: u32 = 2;

/// How many goroutine ids a P takes from the global generator at once
/// (Go's `_GoidCacheBatch`).
pub const GOIDCACHE_BATCH: u64 = 16;

/// Per-P event counters (relaxed atomics: read by anyone, written by the
/// owner).
#[derive(Default)]
pub(crate) struct PCounters {
    pub(crate) spawned: core::sync::atomic::AtomicU64,
    pub(crate) stolen: core::sync::atomic::AtomicU64,
    pub(crate) parked: core::sync::atomic::AtomicU64,
    pub(crate) scheduled: core::sync::atomic::AtomicU64,
    pub(crate) runq_hwm: AtomicU32,
}

impl PCounters {
    /// Adds `n` to one of these counters: a relaxed load and store, not a
    /// `fetch_add` (no locked instruction). Only the M that holds the P
    /// writes its counters, and holding a P is exclusive (`acquirep` takes
    /// it through the scheduler lock or an idle list, which orders one
    /// holder's writes before the next one's), so no increment is lost;
    /// readers (`Sched::pstats`) only need some recent value.
    #[inline]
    pub(crate) fn add(counter: &core::sync::atomic::AtomicU64, n: u64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
}

/// A list of Gs linked by `schedlink`, with a tail for FIFO use (Go's
/// `gQueue`).
pub(crate) struct GQueue {
    pub(crate) head: *mut G,
    pub(crate) tail: *mut G,
    pub(crate) size: usize,
}

/// The state behind [`Sched::lock`] (Go's `schedt` fields that
/// `sched.lock` guards).
pub(crate) struct SchedLocked {
    /// The global run queue.
    pub(crate) runq: GQueue,
    /// Idle Ms, linked by `M::schedlink`.
    pub(crate) midle: *mut M,
    /// Idle Ps, linked by `P::link`.
    pub(crate) pidle: *mut P,
    /// Dead Gs with stacks, beyond what the Ps keep. Unbounded: trimmed
    /// lazily by idle Ms (`gftrim`).
    pub(crate) gfree: GQueue,
    /// The fewest Gs `gfree` held since the last `gftrim`: that many sat
    /// unused all along, and are what the next trim may free.
    pub(crate) gfree_low: usize,
    /// When `gftrim` last looked (`Platform::nanotime`).
    pub(crate) gftrim_at: u64,
    /// Dead Gs without stacks, beyond what the Ps keep (see
    /// [`lazystack`](crate::lazystack)). A G without a stack costs only
    /// its own few hundred bytes: kept until the scheduler is dropped, as
    /// Go keeps its `gFree.noStack`.
    pub(crate) gfree_nostack: GQueue,
    /// The fewest Gs `gfree_nostack` held since the last `gftrim` (as
    /// `gfree_low`).
    pub(crate) gfree_nostack_low: usize,
    /// Locked Ms sleeping in `stoplockedm` (Go's `nmidlelocked`): those
    /// with `M::lockedsleep` set.
    pub(crate) nmidlelocked: u32,
    /// Ms that have runnable bound Gs and wait for a P, linked by
    /// `M::schedlink` (see [`crate::bound`]); never non-empty while a P is
    /// idle.
    pub(crate) mwantp: *mut M,
}

// SAFETY: the raw pointers are to runtime-owned Gs, Ms and Ps, which live
// as long as the Sched; they are only followed under the lock or by the
// owner the protocol names.
unsafe impl Send for SchedLocked {}

/// One scheduler: its Ps, queues and idle lists (Go's `schedt` plus
/// `allp`). A hosted `Runtime` owns one.
pub struct Sched {
    /// Guards the global run queue, the idle lists and the global free list.
    pub(crate) lock: spin::Mutex<SchedLocked>,
    /// Length of the global run queue, readable without the lock.
    pub(crate) runqsize: AtomicU32,
    /// Idle Ps (length of `pidle`).
    pub(crate) npidle: AtomicU32,
    /// Spinning Ms: looking for work, not yet found.
    pub(crate) nmspinning: AtomicU32,
    /// All Ps, `allp[i].id == i`.
    pub(crate) allp: alloc::vec::Vec<*mut P>,
    /// Every M made for this scheduler, freed with it.
    pub(crate) allm: spin::Mutex<alloc::vec::Vec<*mut M>>,
    /// Every G made for this scheduler and the slabs they live in, freed
    /// with it (`crate::gslab`).
    pub(crate) allgs: spin::Mutex<crate::gslab::AllGs>,
    /// Ms whose threads have not finished yet.
    pub(crate) nmlive: AtomicU32,
    /// Set when the scheduler shuts down: Ms exit instead of idling.
    pub(crate) stopping: core::sync::atomic::AtomicBool,
    /// User Gs that exist and have not finished.
    pub(crate) ngoroutines: core::sync::atomic::AtomicI64,
    /// Stack size of every G.
    pub(crate) stack_size: usize,
    /// Gs get stacks without a hardware guard (arena stacks with soft
    /// guards): set only by the `unsafe`
    /// [`Sched::use_unguarded_stacks`]. Relaxed: it only picks the
    /// allocator for the next new G's stack; nothing is published with it.
    pub(crate) unguarded_stacks: core::sync::atomic::AtomicBool,
    /// Thread creation, futexes, CPU count.
    pub(crate) platform: &'static dyn crate::platform::Platform,
    /// Source of M ids.
    pub(crate) mnext: core::sync::atomic::AtomicI64,
    /// Victim orders for stealing.
    pub(crate) steal_order: crate::proc::RandomOrder,
    /// Called when every P is idle with goroutines still alive and nothing
    /// runnable: a deadlock, unless something outside the runtime will wake
    /// them. `block_on` registers one (Go's `checkdead`).
    pub(crate) deadlock_hooks: spin::Mutex<alloc::vec::Vec<(u64, DeadlockHook)>>,
    /// The execution trace's buffers (empty until `start_trace`).
    pub(crate) trace: crate::trace::SchedTrace,
    /// A panic that escapes a goroutine is reported and ends only that
    /// goroutine (instead of the process). Hosted only: without `std` a
    /// panic goes to the embedder's panic handler.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) report_panics: bool,
    /// This scheduler's own `Arc`, weakly: handed to park handles.
    pub(crate) self_weak: alloc::sync::Weak<Sched>,
    /// Goroutines of this scheduler waiting for something another runtime
    /// will do (joining its goroutine): while any do, all-idle is not a
    /// deadlock.
    pub(crate) external_waits: AtomicU32,
    /// Threads holding no P that are starting a goroutine
    /// (`crate::spawning`): while any are, all-idle is not a deadlock.
    pub(crate) nspawning: AtomicU32,
    /// The idle M that sleeps until the next timer, and how to wake it
    /// (Go's `sched.pollUntil` and `netpollBreak`; see [`crate::time`]).
    pub(crate) timerpoll: crate::time::TimerPoll,
    /// The network poller and its waiters (crate::netpoll).
    pub(crate) netpoll: crate::netpoll::NetpollState,
    /// Ms with a locked G (`M::lockedg` non-null), for [`stats`]. Changed
    /// only by `lock_os_thread`, `unlock_os_thread` and the exit of a locked
    /// G, never on the scheduling paths.
    ///
    /// [`stats`]: Sched::stats
    pub(crate) nmlocked: AtomicU32,
    /// Length of `SchedLocked::mwantp`, readable without the lock.
    pub(crate) nmwantp: AtomicU32,
    /// Go's full migration: started Gs may resume on any M (the `unsafe`
    /// opt-in; see [`crate::bound`]). False by default: a started G runs
    /// only on the M it started on.
    pub(crate) migrate: bool,
    /// The teardown barrier (see [`crate::teardown`]).
    pub(crate) teardown: TeardownBarrier,
    /// Joined CPUs, the lock-free list of Ms, `wantm` (see [`crate::cpu`]).
    pub(crate) cpus: crate::cpu::Cpus,
    /// Nodes posted by interrupt handlers (see [`crate::intr`]).
    pub(crate) inject: crate::intr::Inject,
    /// sysmon's state: its sleep, its per-P records, the stall limit (see
    /// [`crate::sysmon`]).
    pub(crate) sysmon: crate::sysmon::Sysmon,
    /// Timer-interrupt preemption, off until a kernel enables it
    /// ([`crate::preempt`]).
    pub(crate) preempt: crate::preempt::PreemptState,
}

/// Ms arriving at the teardown (see [`crate::teardown`]).
pub(crate) struct TeardownBarrier {
    /// Ms that have arrived.
    pub(crate) arrived: AtomicU32,
    /// Set once every live M has arrived.
    pub(crate) go: core::sync::atomic::AtomicBool,
    /// Bumped when `go` is set; Ms wait on it.
    pub(crate) wake: AtomicU32,
    /// Wake-ups of this scheduler's goroutines under way on threads that
    /// are not its running Ms (`crate::sema::ready_outside`): `go` waits
    /// for none to be left.
    pub(crate) outside: AtomicU32,
}

impl TeardownBarrier {
    pub(crate) const fn new() -> Self {
        TeardownBarrier {
            arrived: AtomicU32::new(0),
            go: core::sync::atomic::AtomicBool::new(false),
            wake: AtomicU32::new(0),
            outside: AtomicU32::new(0),
        }
    }
}

/// The scheduler whose M the calling thread is (the current G's M's: a
/// goroutine of it, or an M's own stack, as in a timer callback); null on
/// a thread that is no M, or on an M of no scheduler.
#[inline]
pub(crate) fn current_sched() -> *const Sched {
    let gp = crate::tls::getg();
    // SAFETY: a non-null current G has a live M (mstart / execute set it),
    // or none; the M's scheduler is set once, when the M is made.
    unsafe {
        if gp.is_null() || (*gp).m.is_null() {
            core::ptr::null()
        } else {
            (*(*gp).m).rt
        }
    }
}

/// See [`Sched::deadlock_hooks`].
pub(crate) type DeadlockHook = alloc::sync::Arc<dyn Fn() + Send + Sync>;

// SAFETY: every field is an atomic, a lock, or immutable after creation
// (allp, stack_size, platform, steal_order); the Ps behind allp are
// touched under the rules their fields state.
unsafe impl Sync for Sched {}
// SAFETY: as above; nothing in a Sched is tied to a thread.
unsafe impl Send for Sched {}

// ---------------------------------------------------------------------
// Offsets the asm uses. Each is computed from the struct, then pinned: a
// change in layout fails here first, and again in `cargo xtask offsets
// --check` until the published tables are regenerated.

/// `Stack.lo`.
pub const STACK_LO: usize = offset_of!(Stack, lo);
/// `Stack.hi`.
pub const STACK_HI: usize = offset_of!(Stack, hi);

/// `Gobuf.sp`.
pub const GOBUF_SP: usize = offset_of!(Gobuf, sp);
/// `Gobuf.pc`.
pub const GOBUF_PC: usize = offset_of!(Gobuf, pc);
/// `Gobuf.g`.
pub const GOBUF_G: usize = offset_of!(Gobuf, g);
/// `Gobuf.ctxt`.
pub const GOBUF_CTXT: usize = offset_of!(Gobuf, ctxt);
/// `Gobuf.bp`.
pub const GOBUF_BP: usize = offset_of!(Gobuf, bp);
/// `Gobuf.rbx`.
pub const GOBUF_RBX: usize = offset_of!(Gobuf, rbx);
/// `Gobuf.r12`.
pub const GOBUF_R12: usize = offset_of!(Gobuf, r12);
/// `Gobuf.r13`.
pub const GOBUF_R13: usize = offset_of!(Gobuf, r13);
/// `Gobuf.r14`.
pub const GOBUF_R14: usize = offset_of!(Gobuf, r14);
/// `Gobuf.r15`.
pub const GOBUF_R15: usize = offset_of!(Gobuf, r15);

/// `FuncVal.fn_`.
pub const FUNCVAL_FN: usize = offset_of!(FuncVal, fn_);

/// `G.stack`.
pub const G_STACK: usize = offset_of!(G, stack);
/// `G.sched`.
pub const G_SCHED: usize = offset_of!(G, sched);
/// `G.m`.
pub const G_M: usize = offset_of!(G, m);
/// `G.goid`.
pub const G_GOID: usize = offset_of!(G, goid);

/// `M.g0`.
pub const M_G0: usize = offset_of!(M, g0);
/// `M.curg`.
pub const M_CURG: usize = offset_of!(M, curg);
/// `M.gsignal`.
pub const M_GSIGNAL: usize = offset_of!(M, gsignal);

/// `G.sched.sp`: the field `mcall` and `systemstack` load to reach g0's
/// stack, and save a G's stack pointer into.
pub const G_SCHED_SP: usize = G_SCHED + GOBUF_SP;
/// `G.sched.pc`.
pub const G_SCHED_PC: usize = G_SCHED + GOBUF_PC;
/// `G.sched.bp`.
pub const G_SCHED_BP: usize = G_SCHED + GOBUF_BP;
/// `G.sched.rbx`.
pub const G_SCHED_RBX: usize = G_SCHED + GOBUF_RBX;
/// `G.sched.r12`.
pub const G_SCHED_R12: usize = G_SCHED + GOBUF_R12;
/// `G.sched.r13`.
pub const G_SCHED_R13: usize = G_SCHED + GOBUF_R13;
/// `G.sched.r14`.
pub const G_SCHED_R14: usize = G_SCHED + GOBUF_R14;
/// `G.sched.r15`.
pub const G_SCHED_R15: usize = G_SCHED + GOBUF_R15;

// Pinned values: the published tables and any embedder's asm rely on them.
const_assert_eq!(STACK_LO, 0);
const_assert_eq!(STACK_HI, 8);
const_assert_eq!(core::mem::size_of::<Stack>(), 16);

const_assert_eq!(GOBUF_SP, 0);
const_assert_eq!(GOBUF_PC, 8);
const_assert_eq!(GOBUF_G, 16);
const_assert_eq!(GOBUF_CTXT, 24);
const_assert_eq!(GOBUF_BP, 32);
const_assert_eq!(GOBUF_RBX, 40);
const_assert_eq!(GOBUF_R12, 48);
const_assert_eq!(GOBUF_R13, 56);
const_assert_eq!(GOBUF_R14, 64);
const_assert_eq!(GOBUF_R15, 72);
const_assert_eq!(core::mem::size_of::<Gobuf>(), 80);

const_assert_eq!(FUNCVAL_FN, 0);

const_assert_eq!(G_STACK, 0);
const_assert_eq!(G_SCHED, 16);
const_assert_eq!(G_M, 96);
const_assert_eq!(G_GOID, 104);

const_assert_eq!(M_G0, 0);
const_assert_eq!(M_CURG, 8);
const_assert_eq!(M_GSIGNAL, 16);

// Every field the asm touches is a naturally aligned 8-byte word.
const_assert!(core::mem::align_of::<G>() >= 8);
const_assert!(core::mem::align_of::<M>() >= 8);
const_assert!(core::mem::align_of::<Gobuf>() == 8);

/// One row of the published offset tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldOffset {
    /// The constant's name, e.g. `GOBUF_SP`.
    pub name: &'static str,
    /// `Struct.field` (or `Struct` for a size row).
    pub field: &'static str,
    /// Offset in bytes (for a size row, the size).
    pub offset: usize,
    /// Size of the field in bytes.
    pub size: usize,
}

macro_rules! row {
    ($name:ident, $ty:ident . $($field:ident).+, $size:expr) => {
        FieldOffset {
            name: stringify!($name),
            field: concat!(stringify!($ty), $(".", stringify!($field)),+),
            offset: $name,
            size: $size,
        }
    };
}

const W: usize = core::mem::size_of::<usize>();

/// Every offset constant, in the order of the published tables.
pub const OFFSETS: &[FieldOffset] = &[
    row!(STACK_LO, Stack.lo, W),
    row!(STACK_HI, Stack.hi, W),
    row!(GOBUF_SP, Gobuf.sp, W),
    row!(GOBUF_PC, Gobuf.pc, W),
    row!(GOBUF_G, Gobuf.g, W),
    row!(GOBUF_CTXT, Gobuf.ctxt, W),
    row!(GOBUF_BP, Gobuf.bp, W),
    row!(GOBUF_RBX, Gobuf.rbx, W),
    row!(GOBUF_R12, Gobuf.r12, W),
    row!(GOBUF_R13, Gobuf.r13, W),
    row!(GOBUF_R14, Gobuf.r14, W),
    row!(GOBUF_R15, Gobuf.r15, W),
    row!(FUNCVAL_FN, FuncVal.fn_, W),
    row!(G_STACK, G.stack, core::mem::size_of::<Stack>()),
    row!(G_SCHED, G.sched, core::mem::size_of::<Gobuf>()),
    row!(G_SCHED_SP, G.sched.sp, W),
    row!(G_SCHED_PC, G.sched.pc, W),
    row!(G_SCHED_BP, G.sched.bp, W),
    row!(G_SCHED_RBX, G.sched.rbx, W),
    row!(G_SCHED_R12, G.sched.r12, W),
    row!(G_SCHED_R13, G.sched.r13, W),
    row!(G_SCHED_R14, G.sched.r14, W),
    row!(G_SCHED_R15, G.sched.r15, W),
    row!(G_M, G.m, W),
    row!(G_GOID, G.goid, 8),
    row!(M_G0, M.g0, W),
    row!(M_CURG, M.curg, W),
    row!(M_GSIGNAL, M.gsignal, W),
];

/// Struct sizes published with the offsets (`SIZEOF_GOBUF`, …).
pub const SIZES: &[(&str, &str, usize)] = &[
    ("SIZEOF_STACK", "Stack", core::mem::size_of::<Stack>()),
    ("SIZEOF_GOBUF", "Gobuf", core::mem::size_of::<Gobuf>()),
    ("SIZEOF_G", "G", core::mem::size_of::<G>()),
    ("SIZEOF_M", "M", core::mem::size_of::<M>()),
    ("SIZEOF_P", "P", core::mem::size_of::<P>()),
];
