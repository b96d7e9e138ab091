//! Hosted: catching a goroutine's stack overflow (Go's `signal_unix.go`).
//!
//! Every stack `stackalloc` maps has a `PROT_NONE` guard page below it. A G
//! that runs off its stack faults there with SIGSEGV (or SIGBUS). The
//! handler, running on the thread's alternate signal stack (the G's own
//! stack is the one that is full), looks at the current G and says which
//! check fired and where:
//!
//! 1. the fault address is in the G's guard page: `stack overflow:
//!    goroutine N faulted at A in the guard page below its stack [lo, hi)`;
//! 2. the G's stack is an unguarded one (soft guard, see
//!    [`stackalloc_unguarded`](crate::stack::stackalloc_unguarded)) and
//!    its soft guard page was written: `… goroutine N's soft guard below its
//!    stack [lo, hi) was written (found at a segmentation fault at A)`;
//! 3. the fault is elsewhere but the G's stack pointer is below its stack:
//!    `… goroutine N's stack pointer P is below its stack [lo, hi);
//!    segmentation fault at A (not in goroutine N's guard page [g, lo))` —
//!    never "in the guard page" when the address was not.
//!
//! then aborts. Any other fault goes to the handler that was there before
//! (Rust's own, which reports overflows of thread stacks), or to the
//! default action.

use core::mem::MaybeUninit;
use core::ptr::null_mut;

use crate::panic::Overflow;
use crate::runtime2::G;
use crate::stack::PAGE_SIZE;
use crate::tls::getg;

/// Size of the alternate signal stack gokernel gives a thread that has
/// none.
const ALTSTACK_SIZE: usize = 64 * 1024;

/// The signals a stack overflow raises.
const SIGNALS: [libc::c_int; 2] = [libc::SIGSEGV, libc::SIGBUS];

/// The handlers that were installed before ours, per entry of [`SIGNALS`].
struct OldActions([libc::sigaction; 2]);
// SAFETY: written once inside `Once::call_once`, read-only afterwards.
unsafe impl Sync for OldActions {}
// SAFETY: plain C data.
unsafe impl Send for OldActions {}

static OLD: spin::Once<OldActions> = spin::Once::new();

/// Installs the handler for the whole process, once.
pub(crate) fn initsig() {
    OLD.call_once(|| {
        // SAFETY: sigaction with a zeroed struct filled in as the manual
        // says; the old actions are kept for chaining.
        unsafe {
            let mut old: [libc::sigaction; 2] = MaybeUninit::zeroed().assume_init();
            for (i, &sig) in SIGNALS.iter().enumerate() {
                let mut sa: libc::sigaction = MaybeUninit::zeroed().assume_init();
                sa.sa_sigaction = sighandler as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, &mut old[i]);
            }
            OldActions(old)
        }
    });
}

/// An alternate signal stack installed for this thread by [`minitsignals`];
/// removed and freed on drop.
pub(crate) struct AltStack {
    mem: *mut libc::c_void,
}

/// Makes sure this thread has an alternate signal stack (Go's
/// `minitSignalStack`): Rust's std gives its threads one; a thread without
/// gets one here, for as long as the returned guard lives.
pub(crate) fn minitsignals() -> Option<AltStack> {
    // SAFETY: queries this thread's alternate stack into a local.
    let mut cur: libc::stack_t = unsafe { MaybeUninit::zeroed().assume_init() };
    // SAFETY: as above.
    unsafe { libc::sigaltstack(null_mut(), &mut cur) };
    if cur.ss_flags & libc::SS_DISABLE == 0 {
        return None;
    }
    // SAFETY: a fresh anonymous mapping.
    let mem = unsafe {
        libc::mmap(
            null_mut(),
            ALTSTACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return None;
    }
    let st = libc::stack_t {
        ss_sp: mem,
        ss_flags: 0,
        ss_size: ALTSTACK_SIZE,
    };
    // SAFETY: installs a live mapping as this thread's alternate stack.
    unsafe { libc::sigaltstack(&st, null_mut()) };
    Some(AltStack { mem })
}

impl Drop for AltStack {
    fn drop(&mut self) {
        let off = libc::stack_t {
            ss_sp: null_mut(),
            ss_flags: libc::SS_DISABLE,
            ss_size: 0,
        };
        // SAFETY: disables this thread's alternate stack (ours), then
        // unmaps it; no signal handler runs on it at this point.
        unsafe {
            libc::sigaltstack(&off, null_mut());
            libc::munmap(self.mem, ALTSTACK_SIZE);
        }
    }
}

/// Whether a fault at `addr` with stack pointer `rsp` on the current G `gp`
/// is that G running off its stack, and which check says so (see the
/// module docs). `None`: some other fault.
fn classify(gp: *mut G, sig: libc::c_int, addr: usize, rsp: usize) -> Option<Overflow> {
    // SAFETY: the current G is live (it is the one that faulted, or g0).
    let (st, mem) = unsafe { ((*gp).stack, (*gp).stackmem.as_ref()) };
    // Only stacks gokernel allocated have a guard of either kind (g0 runs
    // on its thread's stack, whose guard is the thread's).
    let mem = mem?;
    if st.lo == 0 {
        return None;
    }
    let guard_page = !mem.has_soft_guard();
    let in_guard = |a: usize| a < st.lo && a >= st.lo - PAGE_SIZE;
    let what = if sig == libc::SIGBUS {
        "bus error"
    } else {
        "segmentation fault"
    };
    if guard_page && in_guard(addr) {
        return Some(Overflow::GuardPage { addr });
    }
    if !guard_page && !crate::stack::soft_guard_page_clean(mem) {
        return Some(Overflow::SoftGuardAtFault { what, addr });
    }
    // A G's stack pointer is never below its stack, however far it went.
    if rsp < st.lo && st.lo - rsp <= crate::stack::STACK_MAX {
        return Some(Overflow::SpBelowStack {
            what,
            addr,
            sp: rsp,
            guard_page,
        });
    }
    None
}

/// The SIGSEGV / SIGBUS handler (Go's `sighandler`, for this one job).
///
/// # Safety
///
/// Only the kernel calls it, as an `SA_SIGINFO` handler.
unsafe extern "C" fn sighandler(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo and ucontext.
    let (addr, rsp) = unsafe {
        let uc = uctx as *const libc::ucontext_t;
        (
            (*info).si_addr() as usize,
            (*uc).uc_mcontext.gregs[libc::REG_RSP as usize] as usize,
        )
    };
    let gp = getg();
    if !gp.is_null()
        && let Some(how) = classify(gp, sig, addr, rsp)
    {
        crate::panic::stackoverflow_at(gp, how);
    }
    // Not a goroutine's overflow: whoever handled it before.
    let idx = usize::from(sig != SIGNALS[0]);
    let Some(old) = OLD.get() else { return };
    let old = &old.0[idx];
    // SAFETY: calling or reinstating the previous action, as sigaction(2)
    // describes it.
    unsafe {
        if old.sa_sigaction == libc::SIG_DFL || old.sa_sigaction == libc::SIG_IGN {
            // Back to the default action; returning re-runs the faulting
            // instruction, which now ends the process as it would have.
            libc::sigaction(sig, old, null_mut());
        } else if old.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                core::mem::transmute(old.sa_sigaction);
            f(sig, info, uctx);
        } else {
            let f: extern "C" fn(libc::c_int) = core::mem::transmute(old.sa_sigaction);
            f(sig);
        }
    }
}

// ---------------------------------------------------------------------
// SIGQUIT: a goroutine dump on demand.
//
// Go's SIGQUIT prints every goroutine and exits (status 2). gokernel
// prints the same dump on stderr and lets the program go on (as the JVM's
// SIGQUIT thread dump does): it is a library inside someone else's
// program, and a dump one can take twice is the more useful one. The
// handler only writes a byte to a pipe (async-signal-safe); a thread of
// its own reads it and prints `gokernel::dump()`, so the dump takes locks
// and allocates outside the handler. The handler is installed when the
// first runtime is built, and only if SIGQUIT still has its default
// action: a program that handles SIGQUIT itself keeps its handler (and
// may call `gokernel::dump()` from it, off the signal context).

/// Every runtime built so far, for `gokernel::dump()` and SIGQUIT.
static RUNTIMES: std::sync::Mutex<alloc::vec::Vec<alloc::sync::Weak<crate::runtime2::Sched>>> =
    std::sync::Mutex::new(alloc::vec::Vec::new());

/// The write end of the SIGQUIT pipe (-1: no handler of ours).
static QUIT_PIPE: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(-1);

/// Adds `sched` to the runtimes dumps look at, and installs the SIGQUIT
/// handler once (if SIGQUIT has its default action).
pub(crate) fn register_for_sigquit(sched: &alloc::sync::Arc<crate::runtime2::Sched>) {
    {
        let mut rts = RUNTIMES.lock().unwrap_or_else(|e| e.into_inner());
        rts.retain(|w| w.strong_count() != 0);
        rts.push(alloc::sync::Arc::downgrade(sched));
    }
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(install_sigquit);
}

/// The runtimes alive now.
pub(crate) fn live_runtimes() -> alloc::vec::Vec<alloc::sync::Arc<crate::runtime2::Sched>> {
    let rts = RUNTIMES.lock().unwrap_or_else(|e| e.into_inner());
    rts.iter().filter_map(alloc::sync::Weak::upgrade).collect()
}

fn install_sigquit() {
    // SAFETY: queries SIGQUIT's action into a zeroed local.
    let mut cur: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
    // SAFETY: as above.
    if unsafe { libc::sigaction(libc::SIGQUIT, null_mut(), &mut cur) } != 0
        || cur.sa_sigaction != libc::SIG_DFL
    {
        return;
    }
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two descriptors of a local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    let [rd, wr] = fds;
    let started = std::thread::Builder::new()
        .name("gokernel-sigquit".into())
        .spawn(move || sigquit_loop(rd));
    if started.is_err() {
        // SAFETY: our own descriptors, used by nobody else.
        unsafe {
            libc::close(rd);
            libc::close(wr);
        }
        return;
    }
    QUIT_PIPE.store(wr, core::sync::atomic::Ordering::SeqCst);
    // SAFETY: a zeroed sigaction filled in as sigaction(2) says; the
    // handler is async-signal-safe (one write).
    unsafe {
        let mut sa: libc::sigaction = MaybeUninit::zeroed().assume_init();
        sa.sa_sigaction = sigquit_handler as *const () as usize;
        sa.sa_flags = libc::SA_RESTART | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGQUIT, &sa, null_mut());
    }
}

/// The SIGQUIT handler: wakes the dump thread.
extern "C" fn sigquit_handler(_sig: libc::c_int) {
    let fd = QUIT_PIPE.load(core::sync::atomic::Ordering::Relaxed);
    // SAFETY: errno is thread-local and saved around the write (an
    // async-signal-safe call) so the interrupted code sees its own.
    unsafe {
        let errno = *libc::__errno_location();
        let b = 1u8;
        libc::write(fd, (&raw const b).cast(), 1);
        *libc::__errno_location() = errno;
    }
}

/// The dump thread: one dump on stderr per SIGQUIT.
fn sigquit_loop(rd: libc::c_int) {
    use std::io::Write;
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: reads into a local buffer of that size.
        let n = unsafe { libc::read(rd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            return;
        }
        let text = alloc::format!("SIGQUIT: goroutine dump\n\n{}\n", crate::runtime::dump());
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}
