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
//! # The stall detector
//!
//! A goroutine that runs past the stall limit without a scheduling point is
//! reported once on stderr, hosted; `src/stall.rs` says how.

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
                crate::stall::report(sched, pp, ran);
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
            crate::stall::init();
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
