//! Asynchronous preemption on bare metal, from the timer interrupt (Go's
//! `preempt.go`: `asyncPreempt`, `isAsyncSafePoint`, `preemptM`, with
//! `gopreempt_m` being `gosched_m` here). An opt-in:
//! a kernel turns it on with the `unsafe`
//! [`Sched::enable_preemption`](crate::runtime2::Sched::enable_preemption)
//! and calls [`on_timer_interrupt`] from its timer interrupt handler.
//!
//! # What happens
//!
//! 1. The timer interrupt handler calls [`on_timer_interrupt`] with the
//!    CPU's interrupt frame (interrupts off, as in any interrupt gate).
//! 2. It decides (below) whether the interrupted code may be switched out
//!    here. If not, it returns `false` and the handler returns as usual.
//! 3. If so, it does not switch in the handler. It records the
//!    interrupted `rip` in the G (`G::preempt`) and rewrites the frame's
//!    `rip` to [`async_preempt`]: the handler's `iretq` then "returns" into
//!    that trampoline, on the goroutine's own stack, with the goroutine's
//!    `rsp` and `rflags` (interrupts on, as they were), every register as
//!    it was. The interrupt is over (the handler sent its EOI and returned)
//!    before anything is switched.
//! 4. [`async_preempt`] pushes the interrupted `rip` as a return address,
//!    then `rflags` and all 15 general-purpose registers (and, if the
//!    kernel asked for it, the x87/SSE state with `fxsave64`), and calls
//!    `async_preempt2`, which yields exactly as
//!    [`gosched`](crate::proc::gosched) does
//!    (`mcall(gosched_m)`: the G becomes runnable, on its M's own queue if
//!    it is bound, and the M runs `schedule`). This is ordinary goroutine
//!    code, not interrupt context, so the switch is the usual one.
//! 5. When the G is run again, `mcall` returns into `async_preempt2`,
//!    which returns to the trampoline; it restores the vector state, the 15
//!    registers and `rflags` (`popfq`: the arithmetic flags, `DF` and `IF`
//!    as they were when the interrupt came) and `ret`s to the interrupted
//!    instruction. The goroutine cannot tell, but for the time it lost and
//!    the stack below its `rsp` that the trampoline used.
//!
//! So the only state that is ever inconsistent is the frame rewrite, done
//! with interrupts off in the handler, and the trampoline's first seven
//! instructions, which copy the recorded `rip` onto the stack with
//! interrupts on; a G in the trampoline is not preempted again (its
//! `pending` flag is set until it is switched out, and the trampoline is not
//! preemptible text).
//!
//! # Where a goroutine may be preempted (`is_async_safe_point`)
//!
//! Go's compiler marks, for every instruction, whether stopping there is
//! safe, and Go's runtime is written so that interrupting it anywhere
//! (outside the few places it marks) is harmless. Rust has no such
//! marks, and a Rust goroutine interrupted at an arbitrary instruction may
//! hold a spin lock (a channel's, the scheduler's, the kernel
//! allocator's) or be half-way through an update of the scheduler's
//! per-M state. Switching another goroutine onto that CPU then deadlocks
//! (it spins on the lock the preempted one holds, on the only CPU that
//! could release it) or corrupts the state. A text range of gokernel's
//! own code would not say where that can happen: gokernel's generic and
//! `#[inline]` functions are compiled into the caller's functions (with
//! LTO, any function may be), and gokernel holds its locks while running
//! code of `core`, `alloc` and `spin`.
//!
//! So gokernel preempts only where the kernel says it may: the interrupted
//! `rip` must lie in one of the **preemptible text ranges** the kernel
//! gives ([`PreemptConfig::text`]); typically a linker section for the
//! kernel's compute code (`#[unsafe(link_section = ...)]` on
//! `#[inline(never)]` functions). Code in those ranges must hold no
//! gokernel lock and call no gokernel function that could be inlined
//! there, and must hold a kernel lock only under a [`PreemptGuard`]. A
//! goroutine that calls out of the range (into gokernel, `core`, the
//! allocator) is not preempted until it is back. Besides the range:
//!
//! - the current G is its M's `curg` (not g0, not gsignal: the scheduler
//!   and other interrupt-time code are never preempted), running (not in
//!   a blocking call), and its M holds a P in `PRUNNING`
//!   (Go's `canPreemptM`);
//! - preemption is not disabled: no [`PreemptGuard`] is alive on it
//!   (Go's `m.locks`, `m.preemptoff`);
//! - no preemption is already pending on it;
//! - the frame is a ring-0 one (`cs & 3 == 0`): a same-privilege
//!   interrupt, whose `rsp` is the goroutine's;
//! - its stack has room for the trampoline ([`PREEMPT_STACK_NEED`] bytes
//!   above `stack.lo`, the soft guard);
//! - its time slice is over: sysmon set its P's `preempt` flag, or the
//!   same slice (the P's `schedtick`) has been seen by timer interrupts
//!   for [`PreemptConfig::slice_ns`] (Go's `forcePreemptNS`, 10 ms, by
//!   default), timed from the first interrupt that found it running,
//!   wherever it was: a goroutine that yields often is never interrupted.
//!
//! # Why a kernel needs `preempt_disable`
//!
//! Code in the preemptible range that takes a kernel spin lock (its
//! allocator's, a driver's) and is preempted while holding it leaves the
//! lock held while another goroutine runs on that CPU; if that one wants
//! the lock it spins forever (on one CPU nothing else will release it) —
//! or, with a lock that does not spin, corrupts what it protects.
//! [`preempt_disable`] returns a [`PreemptGuard`]: while one is alive on a
//! goroutine, the timer interrupt leaves it alone. A kernel takes one
//! around every such lock that preemptible code can reach, its allocator
//! first (with LTO, `alloc` calls may be inlined into preemptible code),
//! unless it holds them with interrupts off, which keeps the timer out as
//! well. The count lives in the G, so a guard held across a park disables
//! preemption of that goroutine only. Dropping the last guard does not
//! preempt at once: the next timer interrupt does, if the slice is over.
//!
//! # Requirements on the kernel
//!
//! - **No red zone.** The CPU pushes its interrupt frame on the
//!   interrupted stack (ring 0 to ring 0 without an IST), below `rsp`, and
//!   so does the trampoline: code that keeps data below `rsp` (the System V
//!   red zone) loses it. `x86_64-unknown-none` is built without a red
//!   zone (its target spec has `disable-redzone`); a kernel built for
//!   another target must pass `-C no-redzone`.
//! - **Vector state.** Without [`PreemptConfig::save_vector_state`] only
//!   the general-purpose registers and `rflags` are saved, which is right
//!   for a soft-float kernel (`x86_64-unknown-none` is one: no SSE, no x87
//!   in compiled code; the reference kernel is). A kernel that enables SSE
//!   (CR4.OSFXSR) and lets goroutines use it must set the flag: the
//!   trampoline then saves and restores the x87/SSE state with
//!   `fxsave64` / `fxrstor64` (512 bytes on the goroutine's stack). AVX
//!   state (XSAVE) is not saved.
//! - **The handler.** Called with interrupts off, on the interrupted CPU,
//!   with the frame the handler's `iretq` will use; the handler must not
//!   change that frame's `rip` or `rsp` afterwards, and must send its EOI
//!   before its `iretq` as usual (the switch happens after it).
//! - **The clock.** [`Platform::nanotime`](crate::platform::Platform::nanotime)
//!   is called from the handler: it must take no lock.
//!
//! Hosted gokernel has no asynchronous preemption; [`crate::sysmon`] says
//! why and what hosted programs have instead.

use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, compiler_fence};

use crate::asm_amd64::mcall;
use crate::runtime2::{G, PRUNNING, Sched, Stack, status};
use crate::tls::getg;

/// Bytes of goroutine stack the trampoline may use below the interrupted
/// `rsp`: its pushes (17 words), alignment, the x87/SSE area (512 bytes),
/// and the calls down to `mcall`, with room. A goroutine with less left
/// above its stack's `lo` is not preempted.
pub const PREEMPT_STACK_NEED: usize = 1024;

/// The size of the `fxsave64` area.
const FXSAVE_SIZE: usize = 512;

/// What a kernel gives [`Sched::enable_preemption`].
#[derive(Clone, Copy, Debug)]
pub struct PreemptConfig {
    /// The preemptible text: a goroutine is preempted only when the
    /// interrupted instruction lies in one of these address ranges (see
    /// the module docs for what code in them must not do).
    pub text: &'static [Range<usize>],
    /// How long a time slice lasts before the timer interrupt may end it
    /// ([`FORCE_PREEMPT_NS`](crate::sysmon::FORCE_PREEMPT_NS), 10 ms, is
    /// Go's). Measured by timer interrupts, so it ends at the first
    /// interrupt after this long; 0: at every interrupt.
    pub slice_ns: u64,
    /// Save and restore the x87/SSE state (`fxsave64`) across a
    /// preemption: for kernels that enabled SSE.
    pub save_vector_state: bool,
}

/// Why [`Sched::enable_preemption`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreemptError {
    /// Preemption was enabled on this scheduler before.
    AlreadyEnabled,
    /// A range of [`PreemptConfig::text`] ends before it starts.
    BadRange,
}

impl core::fmt::Display for PreemptError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            PreemptError::AlreadyEnabled => "preemption is already enabled on this scheduler",
            PreemptError::BadRange => "a preemptible text range ends before it starts",
        })
    }
}

/// The scheduler's preemption state (`Sched::preempt`).
#[derive(Default)]
pub(crate) struct PreemptState {
    cfg: spin::Once<PreemptConfig>,
    /// Per P (by id): the time slice the timer interrupt last saw.
    slices: spin::Once<alloc::boxed::Box<[SliceRecord]>>,
}

/// The time slice a P's timer interrupts last saw: its `schedtick`, and
/// when it was first seen.
#[derive(Default)]
struct SliceRecord {
    tick: AtomicU32,
    since: AtomicU64,
}

/// A G's preemption state (`G::preempt`). Read by the timer interrupt on
/// the G's CPU; `pc` by the trampoline.
#[derive(Default)]
#[repr(C)]
pub(crate) struct GPreempt {
    /// The interrupted `rip`, from the handler to the trampoline.
    pc: AtomicUsize,
    /// Save the vector state: set by the handler, read by the trampoline.
    fx: AtomicBool,
    /// A preemption was planted and the G has not switched out yet.
    pending: AtomicBool,
    /// [`PreemptGuard`]s alive on this G.
    off: AtomicU32,
    /// Times this G was preempted.
    count: AtomicU64,
}

/// Where the interrupted `rip` waits for the trampoline.
const G_PREEMPT_PC: usize = core::mem::offset_of!(G, preempt) + core::mem::offset_of!(GPreempt, pc);
/// The trampoline's "save the vector state" byte.
const G_PREEMPT_FX: usize = core::mem::offset_of!(G, preempt) + core::mem::offset_of!(GPreempt, fx);

/// The part of an x86_64 interrupt frame the CPU pushes (no error code):
/// what `iretq` pops.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InterruptFrame {
    /// Where the interrupted code resumes.
    pub rip: u64,
    /// Its code segment (the low two bits: its privilege level).
    pub cs: u64,
    /// Its flags (`IF` set: it was interruptible).
    pub rflags: u64,
    /// Its stack pointer.
    pub rsp: u64,
    /// Its stack segment.
    pub ss: u64,
}

impl Sched {
    /// Turns on preemption from the timer interrupt for this scheduler's
    /// goroutines (see [`crate::preempt`]): from now on
    /// [`on_timer_interrupt`] switches out a goroutine whose time slice is
    /// over when it interrupted it in `cfg.text`. Once per scheduler.
    ///
    /// # Safety
    ///
    /// The kernel promises, for as long as the scheduler lives:
    /// - code in `cfg.text` holds no gokernel lock and no kernel lock that
    ///   another goroutine may take, except under a [`PreemptGuard`], and
    ///   does not rely on running uninterrupted on its CPU (it reads no
    ///   per-CPU state that a switch would change under it);
    /// - the kernel is built without a red zone, and if goroutines use
    ///   SSE, `cfg.save_vector_state` is set;
    /// - [`on_timer_interrupt`] is called only as its own `# Safety` says,
    ///   and the platform's `nanotime` may be called from it.
    ///
    /// # Errors
    ///
    /// [`PreemptError::AlreadyEnabled`] on a second call,
    /// [`PreemptError::BadRange`] for a range that ends before it starts.
    ///
    /// # Example
    ///
    /// ```
    /// use gokernel::platform::hosted::HOSTED;
    /// use gokernel::preempt::PreemptConfig;
    /// use gokernel::runtime2::Sched;
    ///
    /// // A kernel's preemptible text, from its linker script.
    /// static TEXT: [core::ops::Range<usize>; 1] = [0x40_0000..0x40_1000];
    /// let sched = Sched::new(1, gokernel::stack::STACK_MIN, &HOSTED);
    /// let cfg = PreemptConfig {
    ///     text: &TEXT,
    ///     slice_ns: gokernel::sysmon::FORCE_PREEMPT_NS,
    ///     save_vector_state: false,
    /// };
    /// // SAFETY: nothing runs in TEXT, and no timer calls in (hosted).
    /// unsafe { sched.enable_preemption(cfg) }.unwrap();
    /// ```
    pub unsafe fn enable_preemption(&self, cfg: PreemptConfig) -> Result<(), PreemptError> {
        if cfg.text.iter().any(|r| r.end < r.start) {
            return Err(PreemptError::BadRange);
        }
        let st = &self.preempt;
        if st.cfg.is_completed() {
            return Err(PreemptError::AlreadyEnabled);
        }
        st.slices
            .call_once(|| self.allp.iter().map(|_| SliceRecord::default()).collect());
        let mut first = false;
        st.cfg.call_once(|| {
            first = true;
            cfg
        });
        if first {
            Ok(())
        } else {
            Err(PreemptError::AlreadyEnabled)
        }
    }
}

/// Go's `isAsyncSafePoint`: may a goroutine interrupted at `pc` with
/// stack pointer `sp` on `stack` be switched out there? `pc` must be in
/// the preemptible text, and the stack must have room for the trampoline.
fn is_async_safe_point(text: &[Range<usize>], pc: usize, sp: usize, stack: Stack) -> bool {
    text.iter().any(|r| r.contains(&pc))
        && sp <= stack.hi
        && sp
            .checked_sub(PREEMPT_STACK_NEED)
            .is_some_and(|low| low >= stack.lo)
}

/// Is the time slice seen now (`tick` = the P's `schedtick`) over? Records
/// a new slice in `rec`. `flagged`: sysmon set the P's `preempt` flag.
fn slice_over(rec: &SliceRecord, tick: u32, flagged: bool, now: u64, slice_ns: u64) -> bool {
    if rec.tick.load(Ordering::Relaxed) != tick || rec.since.load(Ordering::Relaxed) == 0 {
        rec.tick.store(tick, Ordering::Relaxed);
        rec.since.store(now.max(1), Ordering::Relaxed);
        return flagged || slice_ns == 0;
    }
    flagged || now.saturating_sub(rec.since.load(Ordering::Relaxed)) >= slice_ns
}

/// The timer interrupt's call into gokernel (Go's `preemptM` and the
/// signal handler's `doSigPreempt` in one): if the interrupted code is a
/// goroutine of a scheduler with preemption enabled, at a safe point, not
/// under a [`PreemptGuard`], and its time slice is over, rewrites `frame`
/// so that the handler's `iretq` enters [`async_preempt`], which switches
/// the goroutine out and later resumes it exactly (see the module docs).
/// Returns whether it did.
///
/// # Safety
///
/// Bare metal only (hosted code has no such frame: a signal handler must
/// not call it).
///
/// - Called from an interrupt handler, with interrupts disabled, on the
///   CPU that was interrupted, before its EOI or after it, with FS on that
///   CPU's TLS block (its gokernel slot a G or zero, as for every gokernel
///   call: an interrupt taken before the CPU's TLS is set up must not
///   call it);
/// - `frame` points to the CPU-pushed frame (`rip` .. `ss`) that the
///   handler's `iretq` will pop, and the handler does not change its `rip`
///   or `rsp` after this call;
/// - the interrupt handler does not return through another path (a
///   different stack, a task switch).
pub unsafe fn on_timer_interrupt(frame: *mut InterruptFrame) -> bool {
    let gp = getg();
    if gp.is_null() {
        return false;
    }
    // SAFETY: the current G, its M, its scheduler and its P are live while
    // it runs, which it does: we interrupted it (or its M's g0, which
    // the curg check rules out before anything else is read).
    unsafe {
        let mp = (*gp).m;
        if mp.is_null() || (*mp).curg != gp || (*mp).rt.is_null() {
            return false;
        }
        let sched = &*(*mp).rt;
        let Some(cfg) = sched.preempt.cfg.get() else {
            return false;
        };
        let pp = (*mp).p;
        if pp.is_null() || (*pp).status.load(Ordering::Relaxed) != PRUNNING {
            return false;
        }
        let Some(rec) = sched
            .preempt
            .slices
            .get()
            .and_then(|s| s.get((*pp).id as usize))
        else {
            return false;
        };
        // Every tick that finds a G running sees its slice, wherever it is,
        // so that a slice is timed from its first tick.
        let tick = (*pp).schedtick.load(Ordering::Relaxed);
        let flagged = (*pp).preempt.load(Ordering::Relaxed);
        if !slice_over(rec, tick, flagged, sched.platform.nanotime(), cfg.slice_ns) {
            return false;
        }
        let pre = &(*gp).preempt;
        if pre.off.load(Ordering::Relaxed) != 0
            || pre.pending.load(Ordering::Relaxed)
            || (*gp).atomicstatus.load(Ordering::Relaxed) != status::RUNNING
        {
            return false;
        }
        let f = &mut *frame;
        if f.cs & 3 != 0
            || !is_async_safe_point(cfg.text, f.rip as usize, f.rsp as usize, (*gp).stack)
        {
            return false;
        }
        pre.pc.store(f.rip as usize, Ordering::Relaxed);
        pre.fx.store(cfg.save_vector_state, Ordering::Relaxed);
        pre.pending.store(true, Ordering::Relaxed);
        f.rip = async_preempt as *const () as u64;
    }
    true
}

/// `func asyncPreempt()` — the trampoline a preempted goroutine "returns"
/// into from the timer interrupt: saves every register, yields, restores
/// every register and returns to the interrupted instruction.
///
/// Register contract:
/// - in: every register as the goroutine had it when interrupted (rsp,
///   rflags with IF set, all GPRs); TLS g = the goroutine, whose
///   `preempt.pc` holds the interrupted rip; any rsp alignment;
/// - out: returns (`ret`) to `preempt.pc` with every GPR, rflags and rsp
///   as on entry, and the x87/SSE state too when `preempt.fx` was set;
/// - clobbered: nothing;
/// - stack: the goroutine's own; uses at most [`PREEMPT_STACK_NEED`] bytes
///   below the entry rsp (17 words of pushes, 16-byte alignment, the
///   512-byte `fxsave64` area, `async_preempt2`'s frames).
///
/// # Safety
///
/// Only [`on_timer_interrupt`] sends a goroutine here, through the frame.
#[unsafe(naked)]
#[rustfmt::skip]
pub unsafe extern "C" fn async_preempt() {
    core::arch::naked_asm!(
        ".cfi_startproc",
        ".cfi_adjust_cfa_offset -{word}",              // CFA = the interrupted rsp: no return address
        ".cfi_undefined rip",                          // no return address yet
        "lea rsp, [rsp - {word}]",                     // the return slot (no flags touched)
        ".cfi_adjust_cfa_offset {word}",
        "push rax",
        ".cfi_adjust_cfa_offset {word}",
        "mov rax, qword ptr [rip + __gokernel_g@GOTTPOFF]",
        "mov rax, qword ptr fs:[rax]",                 // rax = g
        "mov rax, qword ptr [rax + {g_preempt_pc}]",   // the interrupted rip
        "mov qword ptr [rsp + {word}], rax",           // is our return address
        ".cfi_offset rip, -{word}",
        "pop rax",
        ".cfi_adjust_cfa_offset -{word}",
        "pushfq",                                      // the interrupted flags
        ".cfi_adjust_cfa_offset {word}",
        "push rax",
        "push rbx",
        "push rcx",
        "push rdx",
        "push rsi",
        "push rdi",
        "push rbp",
        "push r8",
        "push r9",
        "push r10",
        "push r11",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        ".cfi_adjust_cfa_offset {gprs}",
        ".cfi_offset rbx, -{at_rbx}",
        ".cfi_offset rbp, -{at_rbp}",
        ".cfi_offset r12, -{at_r12}",
        ".cfi_offset r13, -{at_r13}",
        ".cfi_offset r14, -{at_r14}",
        ".cfi_offset r15, -{at_r15}",
        "mov rbp, rsp",                                // the saved registers
        ".cfi_def_cfa_register rbp",
        "and rsp, -16",                                // the ABI's alignment
        "cld",                                         // Rust wants DF clear
        "mov rax, qword ptr [rip + __gokernel_g@GOTTPOFF]",
        "mov rax, qword ptr fs:[rax]",
        "cmp byte ptr [rax + {g_preempt_fx}], 0",
        "je 2f",
        "sub rsp, {fxsize}",
        "fxsave64 [rsp]",                              // x87/SSE state
        "call {async_preempt2}",                       // yields; back when resumed
        "fxrstor64 [rsp]",
        "jmp 3f",
        "2:",
        "call {async_preempt2}",                       // yields; back when resumed
        "3:",
        "mov rsp, rbp",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop r11",
        "pop r10",
        "pop r9",
        "pop r8",
        "pop rbp",
        ".cfi_def_cfa rsp, {cfa_flags}",
        "pop rdi",
        "pop rsi",
        "pop rdx",
        "pop rcx",
        "pop rbx",
        "pop rax",
        ".cfi_adjust_cfa_offset -{six}",
        "popfq",                                       // flags, IF included
        ".cfi_adjust_cfa_offset -{word}",
        "ret",                                         // to the interrupted rip
        ".cfi_endproc",
        word = const WORD,
        gprs = const 15 * WORD,
        six = const 6 * WORD,
        cfa_flags = const 8 * WORD,
        at_rbx = const 4 * WORD,
        at_rbp = const 9 * WORD,
        at_r12 = const 14 * WORD,
        at_r13 = const 15 * WORD,
        at_r14 = const 16 * WORD,
        at_r15 = const 17 * WORD,
        fxsize = const FXSAVE_SIZE,
        g_preempt_pc = const G_PREEMPT_PC,
        g_preempt_fx = const G_PREEMPT_FX,
        async_preempt2 = sym async_preempt2,
    )
}

/// The size of a stack slot.
const WORD: usize = core::mem::size_of::<usize>();

/// `func asyncPreempt2()` — on the preempted goroutine, its registers
/// saved by [`async_preempt`]: yield as `gosched` does (Go's
/// `gopreempt_m`), and return when the goroutine is run again.
///
/// # Safety
///
/// Only [`async_preempt`] calls it.
unsafe extern "C" fn async_preempt2() {
    let gp = getg();
    // SAFETY: the running G (the trampoline runs on it).
    unsafe {
        let pre = &(*gp).preempt;
        pre.count.fetch_add(1, Ordering::Relaxed);
        // The trampoline has copied `pc`: the next interrupt after this
        // G's switch may plant again (not before: it is not `curg` on g0,
        // and mcall is not preemptible text).
        pre.pending.store(false, Ordering::Relaxed);
        mcall(crate::proc::gosched_m);
    }
}

/// Keeps the timer interrupt from preempting the current goroutine while
/// it lives (Go's `acquirem` / `m.preemptoff`). See the module docs for
/// why a kernel needs it: its allocator and any spin lock that preemptible
/// code takes. Guards nest. Made by [`preempt_disable`].
#[must_use = "preemption is enabled again when the guard is dropped"]
pub struct PreemptGuard {
    gp: *mut G,
    /// `gp`'s goroutine id when the guard was made: a G is reused after
    /// its goroutine exits, so the pointer alone does not say it is the
    /// same goroutine.
    goid: u64,
}

/// Disables preemption of the current goroutine until the returned guard
/// is dropped. Costs two compiler fences and an increment; outside a
/// goroutine (an M's g0, a thread that is no M) it counts on whatever G
/// is current, or on nothing, which is as good: those are never preempted.
///
/// ```
/// let _g = gokernel::preempt::preempt_disable();
/// // ... take the kernel's allocator lock ...
/// ```
pub fn preempt_disable() -> PreemptGuard {
    let gp = getg();
    if !gp.is_null() {
        // SAFETY: the current G is live while it runs; only it and its
        // CPU's interrupt handler touch the count.
        unsafe { (*gp).preempt.off.fetch_add(1, Ordering::Relaxed) };
    }
    // The count is up before anything the guard protects (the interrupt
    // runs on this CPU: program order, not a fence, is what it sees).
    compiler_fence(Ordering::SeqCst);
    // SAFETY: as above.
    let goid = if gp.is_null() {
        0
    } else {
        unsafe { (*gp).goid() }
    };
    PreemptGuard { gp, goid }
}

impl Drop for PreemptGuard {
    /// # Panics
    ///
    /// If dropped on another goroutine than the one that made it. The
    /// guard is not `Send`, but a thread-local can carry it from one
    /// goroutine of a thread to the next, after the first has exited and
    /// its G may have been freed or reused: only the current G is known
    /// to be live, so only it is touched.
    fn drop(&mut self) {
        compiler_fence(Ordering::SeqCst);
        let cur = getg();
        // SAFETY: the current G is live while it runs.
        let same = cur == self.gp && (cur.is_null() || unsafe { (*cur).goid() } == self.goid);
        assert!(
            same,
            "gokernel: a PreemptGuard made on goroutine {} was dropped on goroutine {}; drop it where it was made",
            self.goid,
            // SAFETY: as above.
            if cur.is_null() {
                0
            } else {
                unsafe { (*cur).goid() }
            }
        );
        if !cur.is_null() {
            // SAFETY: the current G, which made the guard (checked above).
            unsafe { (*cur).preempt.off.fetch_sub(1, Ordering::Relaxed) };
        }
    }
}

/// How many times the current goroutine has been preempted by the timer
/// interrupt (0 outside a goroutine). The count belongs to the G
/// structure, which a later goroutine may reuse: compare two readings.
pub fn preemptions() -> u64 {
    let gp = getg();
    if gp.is_null() {
        return 0;
    }
    // SAFETY: the current G is live while it runs.
    unsafe { (*gp).preempt.count.load(Ordering::Relaxed) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack() -> Stack {
        Stack {
            lo: 0x10_0000,
            hi: 0x11_0000,
        }
    }

    #[test]
    fn safe_point_only_in_preemptible_text() {
        let text = [0x1000..0x2000, 0x5000..0x5100];
        let sp = 0x10_8000;
        assert!(is_async_safe_point(&text, 0x1000, sp, stack()));
        assert!(is_async_safe_point(&text, 0x50ff, sp, stack()));
        assert!(!is_async_safe_point(&text, 0x2000, sp, stack()));
        assert!(!is_async_safe_point(&text, 0xfff, sp, stack()));
        assert!(!is_async_safe_point(&[], 0x1000, sp, stack()));
    }

    #[test]
    fn safe_point_needs_room_on_the_stack() {
        let text = [Range {
            start: 0x1000,
            end: 0x2000,
        }];
        let s = stack();
        assert!(is_async_safe_point(
            &text,
            0x1000,
            s.lo + PREEMPT_STACK_NEED,
            s
        ));
        assert!(!is_async_safe_point(
            &text,
            0x1000,
            s.lo + PREEMPT_STACK_NEED - 8,
            s
        ));
        // An rsp that is not on the G's stack (an interrupt stack): no.
        assert!(!is_async_safe_point(&text, 0x1000, s.hi + 8, s));
        assert!(!is_async_safe_point(&text, 0x1000, 8, s));
    }

    #[test]
    fn slice_ends_after_slice_ns_of_one_schedtick() {
        let rec = SliceRecord::default();
        assert!(!slice_over(&rec, 7, false, 1_000, 10_000));
        assert!(!slice_over(&rec, 7, false, 10_999, 10_000));
        assert!(slice_over(&rec, 7, false, 11_000, 10_000));
        // A new slice (the P ran another G): the clock starts again.
        assert!(!slice_over(&rec, 8, false, 11_500, 10_000));
        assert!(!slice_over(&rec, 8, false, 20_000, 10_000));
        assert!(slice_over(&rec, 8, false, 21_500, 10_000));
    }

    #[test]
    fn sysmons_flag_ends_the_slice_at_once() {
        let rec = SliceRecord::default();
        assert!(slice_over(&rec, 1, true, 5, 10_000));
        let rec = SliceRecord::default();
        assert!(slice_over(&rec, 1, false, 5, 0));
    }

    #[test]
    fn enabling_twice_or_with_a_bad_range_is_refused() {
        use crate::platform::hosted::HOSTED;
        static BAD: [Range<usize>; 1] = [Range {
            start: 0x2000,
            end: 0x1000,
        }];
        static GOOD: [Range<usize>; 1] = [Range {
            start: 0x1000,
            end: 0x2000,
        }];
        let sched = Sched::new(1, crate::stack::STACK_MIN, &HOSTED);
        let cfg = |text| PreemptConfig {
            text,
            slice_ns: 0,
            save_vector_state: false,
        };
        // SAFETY: nothing calls on_timer_interrupt hosted.
        unsafe {
            assert_eq!(
                sched.enable_preemption(cfg(&BAD)),
                Err(PreemptError::BadRange)
            );
            assert_eq!(sched.enable_preemption(cfg(&GOOD)), Ok(()));
            assert_eq!(
                sched.enable_preemption(cfg(&GOOD)),
                Err(PreemptError::AlreadyEnabled)
            );
        }
    }

    #[test]
    fn preempt_disable_outside_a_goroutine_counts_on_nothing() {
        let a = preempt_disable();
        let b = preempt_disable();
        assert!(a.gp.is_null() && b.gp.is_null());
        assert_eq!(preemptions(), 0);
    }
}
