//! sysmon, the scheduler's monitor (Go's `sysmon` in `proc.go`): it
//! retakes the Ps of goroutines stuck in calls, bounds time slices, wakes
//! an M for overdue timers, and reports goroutines that hold their P for
//! long without a scheduling point.
//!
//! # Where it runs
//!
//! Hosted, a thread per runtime (`gokernel-sysmon`), started with the
//! runtime's first goroutine and stopped when the runtime is dropped. It
//! holds no P and runs no goroutine. Bare metal, [`sysmon_tick`] is the
//! whole of it: the kernel calls it periodically — from a kernel thread or
//! a deferred work item its timer interrupt schedules, **not** from the
//! interrupt handler itself, since it takes the scheduler's spin locks and
//! the interrupted code may hold them — at least every 10 ms and ideally
//! as often as the delay it returns. Without it there are no time slices:
//! two goroutines that keep waking each other run before the rest of their
//! P's queue for as long as they like, and no P is retaken from a call.
//!
//! # One round (`sysmon_tick`)
//!
//! For each P, sysmon keeps what it saw last (Go's `sysmontick`): the
//! P's `schedtick` (bumped by every `execute` that starts a time slice),
//! its `syscalltick` (bumped by every `entersyscall`), and when each last
//! changed.
//!
//! - **Retake.** A P in `PSYSCALL` whose `syscalltick` has not changed
//!   since the last round has been in the same call for at least one round
//!   (at least 20 µs). sysmon takes it (`PSYSCALL` → `PIDLE`, the
//!   compare-and-swap its M's `exitsyscall` races with; see
//!   [`crate::syscall`]) and hands it off (`handoffp`) — unless nothing
//!   needs it: its run queue is empty, another M is spinning or a P is
//!   idle, no M waits for a P, and the call is under 10 ms (Go's rule).
//! - **Time slices.** A P in `PRUNNING` whose `schedtick` has not changed
//!   for [`FORCE_PREEMPT_NS`] (10 ms) has run one goroutine, or one chain
//!   of goroutines handing `runnext` (or `boundnext`) to each other, for
//!   that long: sysmon sets the P's `preempt` flag. At the P's next
//!   scheduling point `schedule` clears it and puts the chain's next
//!   goroutine behind the queues (`runqdemote`, and `boundnext` to the
//!   tail of the M's own queue), so whatever was waiting runs. The check
//!   costs `schedule` one relaxed load and a compare. It replaced a bound
//!   of 64 hand-offs per chain, which let a chain of 1 ms hand-offs hold
//!   its P 1,000 times longer than one of 1 µs hand-offs (Go's
//!   `TestPingPongHog`, `tests/sysmon.rs`); a count remains as the
//!   backstop for schedulers no sysmon watches
//!   ([`RUNNEXT_LIMIT`](crate::runtime2::RUNNEXT_LIMIT), 4,096 hand-offs:
//!   a chain of microsecond hand-offs may reach it in a few milliseconds,
//!   before its 10 ms, which keeps the shares within Go's factor of 20).
//! - **Timers.** If a timer is more than 1 ms overdue and a P is idle
//!   with no M spinning, sysmon starts one (`wakep`), which runs it. The
//!   timer sleeper (see [`crate::time`]) normally does this; this is the
//!   backstop Go's sysmon also is.
//! - **Stalls.** A P whose `schedtick` has not changed for the stall limit
//!   (default [`STALL_DEFAULT`], `GOKERNEL_STALL`, `Builder::stall_limit`)
//!   is reported once, hosted (see below).
//!
//! # Sleeping (Go's backoff)
//!
//! After a round that retook a P sysmon sleeps 20 µs; after 50 rounds in a
//! row with nothing to do it doubles the sleep each round, up to 10 ms. When
//! every P is idle it sleeps until woken (Go's `sysmonwait`): it sets
//! `wait`, checks again that every P is idle, and sleeps on a futex word;
//! `pidleget`, taking the first P off the idle list, sees `wait` (both
//! sides sequentially consistent: one sees the other) and wakes it. An idle
//! runtime therefore costs nothing (`tests/sysmon.rs` measures the process
//! CPU time over a second of idleness), and a busy one a wake-up every
//! 10 ms.
//!
//! # No asynchronous preemption hosted
//!
//! Go preempts a goroutine that runs 10 ms without a scheduling point by
//! a signal (`SIGURG`) whose handler switches it out wherever it is: Go's
//! compiler records, at every instruction, what the garbage collector and
//! the scheduler need to stop there, and Go's runtime is written so that
//! interrupting it anywhere is safe. Rust code has no such points. A
//! goroutine interrupted at an arbitrary instruction may be inside
//! `malloc` (holding its arena lock) or in the middle of updating a
//! thread-local (a `RefCell` borrow, std's panic count, a thread cache);
//! switching another goroutine of the same thread in there would re-enter
//! that non-reentrant code, and a bound goroutine cannot be moved to
//! another thread instead. So hosted gokernel bounds time slices only at
//! scheduling points (the `preempt` flag above), reports goroutines that
//! have none for long (the stall detector), and gives programs
//! [`blocking`](crate::blocking) for calls that would hold a P. Bare metal,
//! a kernel controls what interrupted code may hold and can opt into
//! preemption from its timer interrupt ([`crate::preempt`]).
//!
//! # The stall detector (hosted)
//!
//! A goroutine that runs past the stall limit without a scheduling point is
//! reported once on stderr: its id, where it was started (the
//! `#[track_caller]` location of its `go` / `spawn`), for how long, and a
//! backtrace of where it is. sysmon sends its thread `SIGURG` (as Go's
//! preemption does; the handler is installed for the process when the
//! first runtime with the detector on starts, and hands any `SIGURG` that
//! is not its own to the handler that was there before). The handler only does async-signal-safe work: it reads
//! its own thread's current G (goid, start location), and walks the stack
//! with libgcc's unwinder (`_Unwind_Backtrace`, the one panics use) into a
//! fixed array — no allocation, no lock of ours — unless the interrupted
//! instruction is in the dynamic loader or in the unwinder itself, which
//! may hold the locks the unwinder takes (the loader's lock on its list of
//! objects is recursive, so a thread interrupted while merely reading the
//! list lets the unwinder in; the unwinder allocates nothing, so a thread
//! interrupted inside `malloc` is no obstacle); there it records the one
//! address. (Capturing a
//! `std::backtrace::Backtrace` in the handler would allocate and take
//! std's backtrace lock: a goroutine stopped inside `malloc` or inside a
//! backtrace of its own would deadlock.) sysmon, an ordinary thread, then
//! names the addresses: from the executable's symbol table (`.symtab`,
//! read from `/proc/self/exe` on the first report, Rust's legacy mangling
//! undone), from the dynamic linker's tables (`dladdr`), or, stripped, as
//! offsets in the executable for `addr2line -Cfe <program>`. The
//! goroutine is not touched (but see below): the
//! handler returns to where it was (`SA_RESTART`, so an interrupted system
//! call resumes). The one thing a goroutine can notice is Go's too: a
//! system call Linux never restarts after a handler (`poll`,
//! `epoll_wait`, `nanosleep`, socket calls with a timeout) returns `EINTR`
//! once; std retries it where it loops (`thread::sleep`, `read_exact`,
//! `write_all`). Bare metal there is nowhere to print and no signal: the
//! stall detector is off.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::runq::runqempty;
use crate::runtime2::{PIDLE, PRUNNING, PSYSCALL, Sched};

/// How long one time slice may last before sysmon asks its P to end it
/// (Go's `forcePreemptNS`): 10 ms.
pub const FORCE_PREEMPT_NS: u64 = 10_000_000;

/// sysmon's shortest sleep between rounds (Go's 20 µs).
pub const SYSMON_MIN_DELAY_NS: u64 = 20_000;

/// sysmon's longest sleep between rounds while some P is busy (Go's 10 ms).
pub const SYSMON_MAX_DELAY_NS: u64 = 10_000_000;

/// The default stall limit: a goroutine reported for running this long
/// without a scheduling point, 1 s. Long enough that compute-bound
/// goroutines doing deliberate work in slices of a few hundred
/// milliseconds, on a loaded machine, are not reported; short enough to
/// name the culprit long before anyone attaches a debugger to a program
/// that looks hung. A hundred times Go's time slice: every goroutine that
/// trips it has held up the others on its thread for a hundred slices.
pub const STALL_DEFAULT_MS: u64 = 1000;

/// [`STALL_DEFAULT_MS`] as a `Duration`.
pub const STALL_DEFAULT: core::time::Duration = core::time::Duration::from_millis(STALL_DEFAULT_MS);

/// What sysmon saw of one P last time (Go's `sysmontick`).
#[derive(Clone, Copy, Default)]
struct PRecord {
    schedtick: u32,
    schedwhen: u64,
    syscalltick: u32,
    syscallwhen: u64,
    /// This time slice was reported as a stall already.
    stalled: bool,
}

/// sysmon's state, kept in the scheduler (`Sched::sysmon`).
pub(crate) struct Sysmon {
    /// sysmon sleeps until the first P leaves the idle list (Go's
    /// `sysmonwait`).
    wait: AtomicBool,
    /// The futex word sysmon sleeps on; bumped to wake it.
    pub(crate) note: AtomicU32,
    /// The stall limit in nanoseconds; 0: off.
    pub(crate) stall_ns: AtomicU64,
    /// Records and backoff, sysmon's own (a lock only so that two callers of
    /// `sysmon_tick` cannot overlap).
    state: spin::Mutex<State>,
}

struct State {
    recs: alloc::vec::Vec<PRecord>,
    /// Rounds in a row that did nothing.
    idle: u32,
    /// The current sleep.
    delay: u64,
    /// Woken from a deep sleep: the records are stale.
    stale: bool,
}

impl Sysmon {
    pub(crate) fn new(procs: usize) -> Sysmon {
        Sysmon {
            wait: AtomicBool::new(false),
            note: AtomicU32::new(0),
            stall_ns: AtomicU64::new(0),
            state: spin::Mutex::new(State {
                recs: alloc::vec![PRecord::default(); procs],
                idle: 0,
                delay: SYSMON_MIN_DELAY_NS,
                stale: true,
            }),
        }
    }
}

/// Wakes sysmon if it sleeps until a P leaves the idle list. Called by
/// `pidleget` after its SeqCst decrement of `npidle`.
#[inline]
pub(crate) fn wakeifwaiting(sched: &Sched) {
    // SeqCst: after pidleget's SeqCst npidle decrement; pairs with
    // sysmon's store of `wait` followed by its load of npidle.
    if sched.sysmon.wait.load(Ordering::SeqCst) {
        wakeup(sched);
    }
}

#[cold]
fn wakeup(sched: &Sched) {
    if sched.sysmon.wait.swap(false, Ordering::SeqCst) {
        sched.sysmon.note.fetch_add(1, Ordering::SeqCst);
        sched.platform.futexwakeup(&sched.sysmon.note, 1);
    }
}

/// One round of sysmon for `sched`: retakes Ps from long calls, ends long
/// time slices, starts an M for overdue timers, reports stalls (hosted).
/// Returns how long to wait before the next round, in nanoseconds, or
/// `None` when every P is idle: then nothing needs watching until a P
/// leaves the idle list.
///
/// Hosted runtimes run it on a thread of their own; a kernel calls it from
/// its timer tick's deferred work (see the module docs for where it must
/// not be called). Two overlapping calls are harmless: the second returns
/// at once.
///
/// # Example
///
/// ```
/// use gokernel::platform::hosted::HOSTED;
/// use gokernel::runtime2::Sched;
///
/// let sched = Sched::new(2, gokernel::stack::STACK_MIN, &HOSTED);
/// // Every P is idle: nothing to watch until one is taken.
/// assert_eq!(gokernel::sysmon::sysmon_tick(&sched), None);
/// ```
pub fn sysmon_tick(sched: &Sched) -> Option<u64> {
    let Some(mut st) = sched.sysmon.state.try_lock() else {
        return Some(SYSMON_MIN_DELAY_NS);
    };
    let procs = sched.allp.len() as u32;
    let now = sched.platform.nanotime();
    if sched.npidle.load(Ordering::SeqCst) == procs {
        // Go's sysmonwait: sleep until the first P is taken. SeqCst store
        // then load, pairing with pidleget's decrement then load.
        sched.sysmon.wait.store(true, Ordering::SeqCst);
        if sched.npidle.load(Ordering::SeqCst) == procs {
            st.stale = true;
            return None;
        }
        sched.sysmon.wait.store(false, Ordering::SeqCst);
    }
    if st.stale {
        st.stale = false;
        for r in st.recs.iter_mut() {
            *r = PRecord {
                schedwhen: now,
                syscallwhen: now,
                ..*r
            };
        }
    }
    let n = retake(sched, &mut st, now);
    // Overdue timers with a P idle and nobody looking: start an M.
    let next = crate::time::timesleepuntil(sched);
    if next != 0
        && next.saturating_add(1_000_000) < now
        && sched.npidle.load(Ordering::SeqCst) != 0
        && sched.nmspinning.load(Ordering::SeqCst) == 0
    {
        crate::proc::wakep(sched);
    }
    if n != 0 {
        st.idle = 0;
        st.delay = SYSMON_MIN_DELAY_NS;
    } else {
        st.idle += 1;
        if st.idle > 50 {
            st.delay = (st.delay * 2).min(SYSMON_MAX_DELAY_NS);
        }
    }
    Some(st.delay)
}

/// Go's `retake`: the per-P part of a round. Returns the Ps retaken.
fn retake(sched: &Sched, st: &mut State, now: u64) -> u32 {
    let mut n = 0;
    let stall_ns = sched.sysmon.stall_ns.load(Ordering::Relaxed);
    for (i, &pp) in sched.allp.iter().enumerate() {
        let rec = &mut st.recs[i];
        // SAFETY: Ps live as long as their scheduler; only atomics (and
        // the atomic run queue) are read.
        let (status, schedtick, syscalltick) = unsafe {
            (
                (*pp).status.load(Ordering::Acquire),
                (*pp).schedtick.load(Ordering::Relaxed),
                (*pp).syscalltick.load(Ordering::Relaxed),
            )
        };
        if status == PIDLE {
            rec.schedwhen = now;
            rec.stalled = false;
            continue;
        }
        if rec.schedtick != schedtick {
            rec.schedtick = schedtick;
            rec.schedwhen = now;
            rec.stalled = false;
        } else if status == PRUNNING {
            let ran = now.saturating_sub(rec.schedwhen);
            if ran >= FORCE_PREEMPT_NS {
                // SAFETY: as above.
                let flag = unsafe { &(*pp).preempt };
                if !flag.load(Ordering::Relaxed) {
                    flag.store(true, Ordering::Relaxed);
                }
            }
            if stall_ns != 0 && ran >= stall_ns && !rec.stalled {
                rec.stalled = true;
                #[cfg(feature = "std")]
                stall::report(sched, pp, ran);
            }
        }
        if status != PSYSCALL {
            continue;
        }
        if rec.syscalltick != syscalltick {
            rec.syscalltick = syscalltick;
            rec.syscallwhen = now;
            continue;
        }
        // Nothing wants the P and the call is short: leave it (Go's rule,
        // and no M waits for a P to run its own goroutines).
        // SAFETY: as above.
        if runqempty(unsafe { &(*pp).runq })
            && sched.nmspinning.load(Ordering::SeqCst) + sched.npidle.load(Ordering::SeqCst) > 0
            && sched.nmwantp.load(Ordering::Relaxed) == 0
            && now.saturating_sub(rec.syscallwhen) < FORCE_PREEMPT_NS
        {
            continue;
        }
        // SAFETY: as above. The compare-and-swap its M's exitsyscall races
        // with: whoever wins owns the P (crate::syscall).
        let won = unsafe {
            (*pp)
                .status
                .compare_exchange(PSYSCALL, PIDLE, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        };
        if won {
            n += 1;
            if crate::proc::handoffp(sched, pp) {
                crate::proc::checkdead(sched);
            }
        }
    }
    n
}

/// Sets the stall limit of `sched`: `None` (or zero) turns the stall
/// detector off. Hosted runtimes take it from `Builder::stall_limit` or
/// `GOKERNEL_STALL`; bare metal it has no effect (nothing to print on).
///
/// ```
/// use std::time::Duration;
/// use gokernel::platform::hosted::HOSTED;
/// use gokernel::runtime2::Sched;
///
/// let sched = Sched::new(1, gokernel::stack::STACK_MIN, &HOSTED);
/// gokernel::sysmon::set_stall_limit(&sched, Some(Duration::from_millis(250)));
/// gokernel::sysmon::set_stall_limit(&sched, None); // off
/// ```
pub fn set_stall_limit(sched: &Sched, limit: Option<core::time::Duration>) {
    let ns = limit.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    sched.sysmon.stall_ns.store(ns, Ordering::Relaxed);
}

// ---------------------------------------------------------------------
// Hosted: the sysmon thread.

/// The hosted sysmon thread of one runtime.
#[cfg(feature = "std")]
pub(crate) struct SysmonThread {
    sched: alloc::sync::Arc<Sched>,
    stop: alloc::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[cfg(feature = "std")]
impl SysmonThread {
    /// Starts sysmon for `sched`.
    pub(crate) fn start(sched: alloc::sync::Arc<Sched>) -> SysmonThread {
        if sched.sysmon.stall_ns.load(Ordering::Relaxed) != 0 {
            stall::init();
        }
        let stop = alloc::sync::Arc::new(AtomicBool::new(false));
        let (s, st) = (sched.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("gokernel-sysmon".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let note = &s.sysmon.note;
                loop {
                    // SeqCst, before the round: a wake-up after this read
                    // makes the sleep below return at once.
                    let seen = note.load(Ordering::SeqCst);
                    if st.load(Ordering::SeqCst) {
                        return;
                    }
                    let delay = sysmon_tick(&s);
                    s.platform.futexsleep(note, seen, delay);
                }
            })
            .expect("gokernel: cannot start the sysmon thread");
        SysmonThread {
            sched,
            stop,
            thread: Some(thread),
        }
    }
}

#[cfg(feature = "std")]
impl Drop for SysmonThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let note = &self.sched.sysmon.note;
        note.fetch_add(1, Ordering::SeqCst);
        self.sched.platform.futexwakeup(note, 1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(feature = "std")]
mod stall {
    //! The stall report: a `SIGURG` to the stalled thread, whose handler
    //! records where it is (module docs of `sysmon`).

    use core::ffi::{c_int, c_void};
    use core::mem::MaybeUninit;
    use core::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

    use crate::runtime2::{P, Sched};

    /// The most frames a report shows.
    const MAXFRAMES: usize = 64;

    const FREE: u32 = 0;
    const ASKED: u32 = 1;
    /// sysmon is filling in the request.
    const PREP: u32 = 4;
    const TAKING: u32 = 2;
    const TAKEN: u32 = 3;

    /// The one request in flight (sysmons of several runtimes take turns).
    struct Req {
        state: AtomicU32,
        tid: AtomicI32,
        goid: AtomicU64,
        loc: AtomicPtr<core::panic::Location<'static>>,
        pc: AtomicUsize,
        unwound: AtomicU32,
        n: AtomicUsize,
        ips: [AtomicUsize; MAXFRAMES],
    }

    static REQ: Req = Req {
        state: AtomicU32::new(FREE),
        tid: AtomicI32::new(0),
        goid: AtomicU64::new(0),
        loc: AtomicPtr::new(core::ptr::null_mut()),
        pc: AtomicUsize::new(0),
        unwound: AtomicU32::new(0),
        n: AtomicUsize::new(0),
        ips: [const { AtomicUsize::new(0) }; MAXFRAMES],
    };

    /// The program's own code: `[lo, hi)` of the main executable's
    /// executable segments.
    static EXE_LO: AtomicUsize = AtomicUsize::new(0);
    static EXE_HI: AtomicUsize = AtomicUsize::new(0);
    static EXE_BASE: AtomicUsize = AtomicUsize::new(0);

    /// The code of the dynamic loader and of libgcc's unwinder (`[lo,
    /// hi)` pairs): a thread interrupted there may hold the locks the
    /// unwinder takes (the loader's, while it changes its list of objects;
    /// the unwinder's own), so it is not unwound.
    static NOUNWIND: [AtomicUsize; 8] = [const { AtomicUsize::new(0) }; 8];

    struct OldAction(libc::sigaction);
    // SAFETY: written once inside `Once::call_once`, read-only afterwards.
    unsafe impl Sync for OldAction {}
    // SAFETY: plain C data.
    unsafe impl Send for OldAction {}
    static OLD: spin::Once<OldAction> = spin::Once::new();

    unsafe extern "C" {
        fn _Unwind_Backtrace(
            trace: unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int,
            arg: *mut c_void,
        ) -> c_int;
        fn _Unwind_GetIP(ctx: *mut c_void) -> usize;
    }

    /// Installs the `SIGURG` handler and finds the executable's code, once.
    pub(super) fn init() {
        OLD.call_once(|| {
            // SAFETY: dl_iterate_phdr calls `phdr` with valid entries; the
            // first is the main program.
            let mut seen = 0usize;
            // SAFETY: phdr's contract: `seen` is a usize that outlives the
            // call.
            unsafe { libc::dl_iterate_phdr(Some(phdr), (&raw mut seen).cast()) };
            // SAFETY: sigaction with a zeroed struct filled in as the
            // manual says; the old action is kept for chaining.
            unsafe {
                let mut old: libc::sigaction = MaybeUninit::zeroed().assume_init();
                let mut sa: libc::sigaction = MaybeUninit::zeroed().assume_init();
                sa.sa_sigaction = handler as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(libc::SIGURG, &sa, &mut old);
                OldAction(old)
            }
        });
    }

    /// `dl_iterate_phdr`'s callback: records the main program's code (the
    /// first object), and the loader's and the unwinder's ([`NOUNWIND`]).
    /// `seen` counts the objects.
    ///
    /// # Safety
    ///
    /// Only `dl_iterate_phdr` calls it, with a valid entry, and `seen`
    /// points at a `usize`.
    unsafe extern "C" fn phdr(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        seen: *mut c_void,
    ) -> c_int {
        // SAFETY: the loader passes a valid entry; `seen` is the counter
        // init passed.
        unsafe {
            let info = &*info;
            let seen = &mut *seen.cast::<usize>();
            *seen += 1;
            if *seen > 1 {
                let name = if info.dlpi_name.is_null() {
                    &b""[..]
                } else {
                    core::ffi::CStr::from_ptr(info.dlpi_name).to_bytes()
                };
                let hit = |pat: &[u8]| name.windows(pat.len()).any(|w| w == pat);
                if hit(b"/ld-") || hit(b"libgcc_s") {
                    let base = info.dlpi_addr as usize;
                    for i in 0..info.dlpi_phnum as usize {
                        let ph = &*info.dlpi_phdr.add(i);
                        if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
                            let (lo, hi) = (
                                base + ph.p_vaddr as usize,
                                base + (ph.p_vaddr + ph.p_memsz) as usize,
                            );
                            // The first free pair, if any is left.
                            if let Some(k) = (0..NOUNWIND.len() / 2)
                                .find(|&k| NOUNWIND[2 * k + 1].load(Ordering::Relaxed) == 0)
                            {
                                NOUNWIND[2 * k].store(lo, Ordering::Relaxed);
                                NOUNWIND[2 * k + 1].store(hi, Ordering::Relaxed);
                            }
                        }
                    }
                }
                return 0; // the next object
            }
            let base = info.dlpi_addr as usize;
            let (mut lo, mut hi) = (usize::MAX, 0);
            for i in 0..info.dlpi_phnum as usize {
                let ph = &*info.dlpi_phdr.add(i);
                if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
                    lo = lo.min(base + ph.p_vaddr as usize);
                    hi = hi.max(base + (ph.p_vaddr + ph.p_memsz) as usize);
                }
            }
            if hi > lo {
                EXE_LO.store(lo, Ordering::Relaxed);
                EXE_HI.store(hi, Ordering::Relaxed);
                EXE_BASE.store(base, Ordering::Relaxed);
            }
        }
        0 // the next object
    }

    fn gettid() -> i32 {
        // SAFETY: gettid takes no arguments and cannot fail.
        unsafe { libc::syscall(libc::SYS_gettid) as i32 }
    }

    /// `_Unwind_Backtrace`'s callback: one frame into the request.
    ///
    /// # Safety
    ///
    /// Only `_Unwind_Backtrace` calls it, with its context for a frame.
    unsafe extern "C" fn frame(ctx: *mut c_void, _: *mut c_void) -> c_int {
        // SAFETY: ctx is the unwinder's context for this frame.
        let ip = unsafe { _Unwind_GetIP(ctx) };
        let n = REQ.n.load(Ordering::Relaxed);
        if n >= MAXFRAMES || ip == 0 {
            return 5; // _URC_END_OF_STACK: stop
        }
        REQ.ips[n].store(ip, Ordering::Relaxed);
        REQ.n.store(n + 1, Ordering::Relaxed);
        0 // _URC_NO_REASON: go on
    }

    /// The `SIGURG` handler. Async-signal-safe: atomics, its own thread's
    /// current G, `_Unwind_Backtrace` only from the program's own code,
    /// a futex wake.
    ///
    /// # Safety
    ///
    /// Only the kernel calls it, as an `SA_SIGINFO` handler: `ctx` is the
    /// interrupted thread's `ucontext_t`.
    unsafe extern "C" fn handler(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
        let ours = REQ.state.load(Ordering::Acquire) == ASKED
            && REQ.tid.load(Ordering::Relaxed) == gettid()
            && REQ
                .state
                .compare_exchange(ASKED, TAKING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok();
        if !ours {
            // Someone else's SIGURG: the handler that was there before.
            if let Some(old) = OLD.get() {
                let h = old.0.sa_sigaction;
                if h != libc::SIG_DFL && h != libc::SIG_IGN {
                    if old.0.sa_flags & libc::SA_SIGINFO != 0 {
                        // SAFETY: a handler the program installed for this
                        // signal, called as it asked to be.
                        let f: unsafe extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) =
                            unsafe { core::mem::transmute(h) };
                        // SAFETY: as above.
                        unsafe { f(sig, info, ctx) };
                    } else {
                        // SAFETY: as above.
                        let f: unsafe extern "C" fn(c_int) = unsafe { core::mem::transmute(h) };
                        // SAFETY: as above.
                        unsafe { f(sig) };
                    }
                }
            }
            return;
        }
        // The current G of this thread: a user G if its M runs it.
        let gp = crate::tls::getg();
        // SAFETY: this thread's own current G and M, which the code we
        // interrupted does not change while it runs on them (a switch
        // would have been a scheduling point).
        let (goid, loc) = unsafe {
            if !gp.is_null() && !(*gp).m.is_null() && (*(*gp).m).curg == gp {
                ((*gp).goid(), (*gp).spawn_location())
            } else {
                (0, None)
            }
        };
        REQ.goid.store(goid, Ordering::Relaxed);
        REQ.loc.store(
            loc.map_or(core::ptr::null_mut(), |l| {
                l as *const core::panic::Location<'static> as *mut _
            }),
            Ordering::Relaxed,
        );
        // SAFETY: the kernel passes a ucontext_t for SA_SIGINFO handlers.
        let pc = unsafe {
            (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RIP as usize] as usize
        };
        REQ.pc.store(pc, Ordering::Relaxed);
        REQ.n.store(0, Ordering::Relaxed);
        let unsafe_pc = (0..NOUNWIND.len() / 2).any(|k| {
            pc >= NOUNWIND[2 * k].load(Ordering::Relaxed)
                && pc < NOUNWIND[2 * k + 1].load(Ordering::Relaxed)
        });
        let unwind = !unsafe_pc && EXE_HI.load(Ordering::Relaxed) != 0;
        if unwind {
            // SAFETY: the interrupted code is neither the loader nor the
            // unwinder, so it holds none of the locks the unwinder takes
            // (the loader's list lock is recursive: a thread interrupted
            // while only reading the list, in dl_iterate_phdr, lets us in);
            // the unwinder allocates nothing and the callback writes only
            // atomics.
            unsafe { _Unwind_Backtrace(frame, core::ptr::null_mut()) };
        }
        REQ.unwound.store(unwind as u32, Ordering::Relaxed);
        REQ.state.store(TAKEN, Ordering::Release);
        // SAFETY: FUTEX_WAKE only uses the address as a key.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                REQ.state.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            )
        };
    }

    /// Reports the stall on P `pp` (its time slice has lasted `ran` ns).
    pub(super) fn report(sched: &Sched, pp: *mut P, ran: u64) {
        // SAFETY: Ps and Ms live as long as their scheduler; only atomics
        // and the immutable ids are read.
        let (pid, mp) = unsafe { ((*pp).id, (*pp).m.load(Ordering::Relaxed)) };
        if mp.is_null() || OLD.get().is_none() {
            return;
        }
        // SAFETY: as above.
        let (mid, tid) = unsafe { ((*mp).id, (*mp).procid.load(Ordering::Relaxed)) };
        if tid == 0 {
            return;
        }
        if REQ
            .state
            .compare_exchange(FREE, PREP, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return; // another runtime's report is in flight
        }
        REQ.tid.store(tid, Ordering::Relaxed);
        // Publish the request (SeqCst store) before the signal.
        REQ.state.store(ASKED, Ordering::SeqCst);
        // SAFETY: tgkill to a thread of this process.
        unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGURG) };
        let deadline = sched.platform.nanotime() + 200_000_000;
        loop {
            let s = REQ.state.load(Ordering::Acquire);
            if s == TAKEN {
                break;
            }
            let now = sched.platform.nanotime();
            if now >= deadline {
                // The thread did not answer (it blocks SIGURG?): withdraw.
                if REQ
                    .state
                    .compare_exchange(ASKED, FREE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    print(&std::format!(
                        "gokernel: P {pid} (thread gokernel-m{mid}) has run one goroutine for {} ms without a scheduling point; its thread did not answer SIGURG\n",
                        ran / 1_000_000
                    ));
                    return;
                }
                continue; // it is taking the backtrace right now
            }
            sched
                .platform
                .futexsleep(&REQ.state, s, Some(deadline - now));
        }
        let goid = REQ.goid.load(Ordering::Relaxed);
        let loc = REQ.loc.load(Ordering::Relaxed);
        let pc = REQ.pc.load(Ordering::Relaxed);
        let unwound = REQ.unwound.load(Ordering::Relaxed) != 0;
        let n = REQ.n.load(Ordering::Relaxed);
        let ips: alloc::vec::Vec<usize> =
            (0..n).map(|i| REQ.ips[i].load(Ordering::Relaxed)).collect();
        REQ.state.store(FREE, Ordering::Release);
        use core::fmt::Write;
        let mut out = alloc::string::String::new();
        let ms = ran / 1_000_000;
        if goid == 0 {
            let _ = writeln!(
                out,
                "gokernel: P {pid} (thread gokernel-m{mid}) has spent {ms} ms in the scheduler without running a goroutine (a long timer callback?)"
            );
        } else {
            let _ = write!(
                out,
                "gokernel: goroutine {goid} has run for {ms} ms without a scheduling point, holding P {pid} on thread gokernel-m{mid}"
            );
            if !loc.is_null() {
                // SAFETY: a &'static Location stored by the handler.
                let l = unsafe { &*loc };
                let _ = write!(out, "; started at {}:{}:{}", l.file(), l.line(), l.column());
            }
            let _ = writeln!(out);
            let _ = writeln!(out, "goroutine {goid} [running]:");
        }
        // From the interrupted frame outwards (the handler's own frames and
        // the signal trampoline come first).
        let start = ips.iter().position(|&ip| ip == pc).unwrap_or(0);
        let frames: &[usize] = if unwound && !ips.is_empty() {
            &ips[start..]
        } else {
            core::slice::from_ref(&pc)
        };
        for (i, &ip) in frames.iter().enumerate() {
            // The first is where the thread was interrupted; the others
            // are return addresses.
            let _ = writeln!(out, "  {i:2}: {}", describe(ip, i > 0));
        }
        if !unwound {
            let _ = writeln!(
                out,
                "  (stopped in the dynamic loader or the unwinder: only the innermost frame is shown)"
            );
        }
        let _ = writeln!(
            out,
            "gokernel: reported once; the goroutine goes on. A call that blocks belongs in gokernel::blocking; \
             long computations should yield (gosched). GOKERNEL_STALL=<ms>|off sets the limit."
        );
        print(&out);
    }

    /// `ip` as `function+0xoff`: from the executable's symbol table
    /// (`.symtab`, read from `/proc/self/exe` on the first report) or from
    /// the dynamic linker's tables (`dladdr`); else as an offset in the
    /// executable (for `addr2line -Cfe <program>`). `ret`: a return
    /// address (looked up one byte back, inside the call).
    fn describe(ip: usize, ret: bool) -> alloc::string::String {
        let (lo, hi) = (
            EXE_LO.load(Ordering::Relaxed),
            EXE_HI.load(Ordering::Relaxed),
        );
        let base = EXE_BASE.load(Ordering::Relaxed);
        if ip >= lo && ip < hi {
            let at = ip - base - usize::from(ret);
            let syms = SYMS.call_once(|| symtab().unwrap_or_default());
            let i = syms.partition_point(|s| s.0 <= at);
            if i > 0 {
                let (start, size, name) = &syms[i - 1];
                if at < start + size.max(&1) {
                    return std::format!("{ip:#x} {}+{:#x}", demangle(name), ip - base - start);
                }
            }
        }
        // SAFETY: dladdr only reads the loader's tables; `info` is written
        // by it.
        unsafe {
            let mut info: libc::Dl_info = MaybeUninit::zeroed().assume_init();
            if libc::dladdr(ip as *const c_void, &mut info) != 0 && !info.dli_sname.is_null() {
                let name = core::ffi::CStr::from_ptr(info.dli_sname).to_string_lossy();
                return std::format!("{ip:#x} {name}+{:#x}", ip - info.dli_saddr as usize);
            }
        }
        let (lo, hi) = (
            EXE_LO.load(Ordering::Relaxed),
            EXE_HI.load(Ordering::Relaxed),
        );
        if ip >= lo && ip < hi {
            std::format!("{ip:#x} (exe+{:#x})", ip - base)
        } else {
            std::format!("{ip:#x}")
        }
    }

    /// The executable's functions: (start, size, mangled name), by start
    /// (offsets from the load base).
    static SYMS: spin::Once<alloc::vec::Vec<(usize, usize, alloc::string::String)>> =
        spin::Once::new();

    /// Reads the function symbols of `/proc/self/exe` (ELF64, little
    /// endian), or `None` if it has no `.symtab` (stripped) or cannot be
    /// read.
    fn symtab() -> Option<alloc::vec::Vec<(usize, usize, alloc::string::String)>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open("/proc/self/exe").ok()?;
        let mut read_at = |off: u64, len: usize| -> Option<alloc::vec::Vec<u8>> {
            let mut buf = alloc::vec![0u8; len];
            f.seek(SeekFrom::Start(off)).ok()?;
            f.read_exact(&mut buf).ok()?;
            Some(buf)
        };
        let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let eh = read_at(0, 64)?;
        if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
            return None;
        }
        let (shoff, shentsize, shnum) = (u64_at(&eh, 0x28), u16_at(&eh, 0x3a), u16_at(&eh, 0x3c));
        if shentsize < 64 || shnum == 0 {
            return None;
        }
        let sh = read_at(shoff, shentsize * shnum)?;
        let section = |i: usize| &sh[i * shentsize..(i + 1) * shentsize];
        let symtab = (0..shnum).map(section).find(|s| u32_at(s, 4) == 2)?; // SHT_SYMTAB
        let strtab = section(u32_at(symtab, 40) as usize);
        let syms = read_at(u64_at(symtab, 24), u64_at(symtab, 32) as usize)?;
        let strs = read_at(u64_at(strtab, 24), u64_at(strtab, 32) as usize)?;
        let mut out = alloc::vec::Vec::new();
        for sym in syms.chunks_exact(24) {
            let (name, info) = (u32_at(sym, 0) as usize, sym[4]);
            let (value, size) = (u64_at(sym, 8) as usize, u64_at(sym, 16) as usize);
            if info & 0xf != 2 || value == 0 || name >= strs.len() {
                continue; // not a defined function (STT_FUNC)
            }
            let end = strs[name..]
                .iter()
                .position(|&c| c == 0)
                .map_or(strs.len(), |e| name + e);
            out.push((
                value,
                size,
                alloc::string::String::from_utf8_lossy(&strs[name..end]).into_owned(),
            ));
        }
        out.sort_unstable_by_key(|s| s.0);
        Some(out)
    }

    /// A Rust symbol in the legacy mangling (`_ZN…E`) as a path, without
    /// its hash; any other name as it is.
    fn demangle(name: &str) -> alloc::string::String {
        if let Some(v0) = name.strip_prefix("_R") {
            return demangle_v0(v0).unwrap_or_else(|| name.into());
        }
        let Some(mut rest) = name.strip_prefix("_ZN") else {
            return name.into();
        };
        let mut parts: alloc::vec::Vec<alloc::string::String> = alloc::vec::Vec::new();
        while let Some(c) = rest.chars().next() {
            if c == 'E' {
                break;
            }
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            let Ok(len) = rest[..digits].parse::<usize>() else {
                return name.into();
            };
            let Some(part) = rest.get(digits..digits + len) else {
                return name.into();
            };
            rest = &rest[digits + len..];
            parts.push(unescape(part));
        }
        if parts.last().is_some_and(|p| {
            p.len() == 17 && p.starts_with('h') && p[1..].chars().all(|c| c.is_ascii_hexdigit())
        }) {
            parts.pop();
        }
        parts.join("::")
    }

    /// A symbol in Rust's v0 mangling (std is built with it), after its
    /// `_R`, as the path of its identifiers: enough for a report (plain
    /// paths come out exact; generic arguments are listed as more path
    /// segments), not a full demangler.
    fn demangle_v0(mut rest: &str) -> Option<alloc::string::String> {
        let mut parts: alloc::vec::Vec<&str> = alloc::vec::Vec::new();
        while let Some(c) = rest.chars().next() {
            if c == 's' && !parts.is_empty() || c == 'C' && rest[1..].starts_with('s') {
                // A disambiguator (`s<base-62>_`, after a crate root `C`).
                let end = rest.find('_')?;
                rest = &rest[end + 1..];
            } else if c.is_ascii_digit() {
                let digits = rest.chars().take_while(char::is_ascii_digit).count();
                let len: usize = rest[..digits].parse().ok()?;
                let mut ident = rest.get(digits..digits + len)?;
                // A leading `_` separates an identifier starting with a
                // digit or `_` from its length.
                if ident.starts_with('_') && len > 0 {
                    ident = rest.get(digits + 1..digits + len + 1)?;
                }
                parts.push(ident);
                rest = &rest[digits + len..];
            } else if c == '.' {
                break; // a suffix (`.llvm.123`)
            } else {
                rest = &rest[c.len_utf8()..];
            }
        }
        (!parts.is_empty()).then(|| parts.join("::"))
    }

    /// Undoes the legacy mangling's escapes (`$LT$`, `..`, …).
    fn unescape(part: &str) -> alloc::string::String {
        let part = part
            .strip_prefix("_$")
            .map_or(part, |p| &part[part.len() - p.len() - 1..]);
        let mut out = alloc::string::String::new();
        let mut rest = part;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("..") {
                out.push_str("::");
                rest = r;
            } else if rest.starts_with('$')
                && let Some(end) = rest[1..].find('$')
            {
                let code = &rest[1..1 + end];
                let ch = match code {
                    "SP" => Some('@'),
                    "BP" => Some('*'),
                    "RF" => Some('&'),
                    "LT" => Some('<'),
                    "GT" => Some('>'),
                    "LP" => Some('('),
                    "RP" => Some(')'),
                    "C" => Some(','),
                    _ => code
                        .strip_prefix('u')
                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                        .and_then(char::from_u32),
                };
                match ch {
                    Some(c) => out.push(c),
                    None => out.push_str(&rest[..end + 2]),
                }
                rest = &rest[end + 2..];
            } else {
                let c = rest.chars().next().unwrap();
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        out
    }

    fn print(s: &str) {
        // One write; a closed stderr is not our business.
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), s.as_bytes());
    }
}
