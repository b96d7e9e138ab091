//! Blocking calls (Go's `entersyscall` / `exitsyscall` family from
//! `proc.go`): a goroutine about to block its thread in something the
//! scheduler cannot see — a system call, a C library, a lock of another
//! world — lets the other goroutines use its P meanwhile.
//!
//! Go keeps these in `proc.go`; here they have a file of their own, as
//! every new concern of the scheduler does, so that `proc.rs` stays the
//! core (`schedule`, `findrunnable`, `execute`, the M and P lists). The
//! functions keep Go's names and structure.
//!
//! # The protocol
//!
//! A P is the right to run goroutines. An M whose goroutine blocks in the
//! kernel holds its P for nothing, so:
//!
//! - **`entersyscall`** (a call that is usually short): the M keeps its G,
//!   which becomes [`status::SYSCALL`]; the M lets go of its P (`m.p` null,
//!   `m.oldp` remembers it) and the P becomes [`PSYSCALL`]. Nothing else
//!   happens — the fast path is a few stores — but from now on sysmon
//!   ([`crate::sysmon`]) may *retake* the P: if the call is still the same
//!   one a sysmon tick later (at least 20 µs), sysmon changes the P from
//!   `PSYSCALL` to `PIDLE` with a compare-and-swap and hands it off
//!   (`handoffp`: to an M at once if there is work, else to the idle list).
//! - **`entersyscallblock`** (a call known to block: [`blocking`]): the P
//!   is handed off at once.
//! - **`exitsyscall`**: first the fast path, `exitsyscallfast`: take the
//!   same P back if it is still `PSYSCALL` (the same compare-and-swap, so
//!   exactly one of the M and sysmon wins), else any idle P. Failing both,
//!   `exitsyscall0` on g0 decides what the G waits for:
//!   - a G bound to its M (the default: started goroutines never change
//!     threads, see [`crate::bound`]; and every locked G) must go on on
//!     this thread, so the M waits for a P *with* its G: it goes on
//!     `mwantp` (`bound::takep_or_wait`), the next P to go idle comes to
//!     it, or an M holding one gives it up at its next scheduling point;
//!   - with the `unsafe` migration opt-in, Go's `exitsyscall0`: the G goes
//!     on the global queue for any M, and this M stops.
//!
//! The race between the returning M and sysmon is decided by the one
//! compare-and-swap on `P::status`. The M's writes before the call
//! (`entersyscall`'s release store of `PSYSCALL`) happen before whatever
//! the retaker does with the P (its acquire), and the retaker never
//! touches the M; the M, having lost, never touches the P.
//!
//! While the G is in the call its M holds no P, so nothing in the G may
//! use one. `checkdead` counts an M in a call as running (`M::insyscall`),
//! so a program whose goroutines are all in calls is not a deadlock; the
//! flag is cleared under the scheduler lock once the G has a P again or
//! waits on `mwantp`, which no idle P coexists with.
//!
//! # What may run inside a blocking call
//!
//! `blocking(f)` and `call(f)` run `f` on the goroutine's own stack and
//! thread. Inside `f`, a park (a channel operation that waits, a lock,
//! `sleep`, `join`, `park`) parks the goroutine without a P
//! (`gopark_insyscall`): its M leaves the call and schedules, and the
//! goroutine, once readied, resumes with a P and enters the call again
//! (`entersyscallblock`). It must not wait for a P before parking: the
//! park's caller holds the lock of what it waits on, which the goroutine
//! running on the only P may be spinning for. A `gosched` holds no lock:
//! it leaves the call (`exitsyscall`, waiting for a P if need be), yields
//! and enters the call again, as Go does for Go code called back from C.
//! Calls that need no P (`go`, `spawn`, an `unpark`, a send that does not
//! wait) just work, the new or woken goroutine going to the global queue
//! or its thread's inbox. A nested `blocking` (or `call`)
//! runs its function inline: the goroutine is in a call already. Outside
//! a goroutine — a plain thread, an M's own stack, a goroutine being torn
//! down — there is no P to give away and `f` just runs. A panic in `f`
//! unwinds through `blocking`, which takes its P back first.
//!
//! What binding costs: the goroutines that started on the thread of a
//! goroutine in a blocking call wait for that thread (they cannot run
//! elsewhere, see [`crate::bound`]); goroutines that have not started yet,
//! and all the others, get the P. A goroutine that must stay responsive
//! while others block is best started on a thread of its own
//! (`spawn_locked`), or the program opts into migration.
//!
//! [`PSYSCALL`]: crate::runtime2::PSYSCALL

use core::ptr::null_mut;
use core::sync::atomic::Ordering;

use crate::asm_amd64::mcall;
use crate::proc::{acquirep, current_user_g, dropg, execute_on, pidleget, releasep, wirep};
use crate::runtime2::{G, M, P, PRUNNING, PSYSCALL, status};

/// The current goroutine if it can enter a call now: a user G of a
/// scheduler M holding a P, not in a call already. Null otherwise (a plain
/// thread, g0, a nested call, a goroutine being torn down without a P).
#[inline]
fn callable_g() -> *mut G {
    let gp = current_user_g();
    if gp.is_null() {
        return gp;
    }
    // SAFETY: a user G of a scheduler M: its M is live and this thread's.
    unsafe {
        if (*gp).atomicstatus.load(Ordering::Relaxed) != status::RUNNING || (*(*gp).m).p.is_null() {
            return null_mut();
        }
    }
    gp
}

/// The P `pp`'s owner starts a call: bumps its call count (sysmon tells
/// calls apart by it).
///
/// # Safety
///
/// `pp` is held by the caller's M.
#[inline]
unsafe fn syscalltick_bump(pp: *mut P) {
    // SAFETY: the contract; owner only, so a load and a store.
    let t = unsafe { &(*pp).syscalltick };
    t.store(t.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// The G `gp`, running on `mp` with a P, enters a call that may block
/// (Go's `entersyscall`): it keeps its M; the P stays where it is, in
/// `PSYSCALL`, for `exitsyscall` to take back or for sysmon to retake.
///
/// # Safety
///
/// `gp` is the caller, a user G of scheduler M `mp` holding a P, status
/// `RUNNING`; it calls [`exitsyscall`] before anything that needs a P.
pub(crate) unsafe fn entersyscall(gp: *mut G, mp: *mut M) {
    // SAFETY: the contract.
    unsafe {
        let pp = (*mp).p;
        if !crate::trace::syscall_enter_fast(pp) {
            // Out of line, so that this path keeps nothing across a call.
            return entersyscall_traced(gp, mp);
        }
        entersyscall_on(gp, mp, pp);
    }
}

/// [`entersyscall`] whose trace record takes the slow path.
///
/// # Safety
///
/// As [`entersyscall`].
#[cold]
#[inline(never)]
unsafe fn entersyscall_traced(gp: *mut G, mp: *mut M) {
    // SAFETY: the contract.
    unsafe {
        let pp = (*mp).p;
        crate::trace::syscall_enter_slow(pp);
        entersyscall_on(gp, mp, pp);
    }
}

/// [`entersyscall`] once its trace record is written; `pp` is `mp.p`.
///
/// # Safety
///
/// As [`entersyscall`].
#[inline(always)]
unsafe fn entersyscall_on(gp: *mut G, mp: *mut M, pp: *mut P) {
    // SAFETY: the contract.
    unsafe {
        syscalltick_bump(pp);
        // Before the P can be retaken (the release store below), so that
        // checkdead, after the retaker idles the P, sees it.
        (*mp).insyscall.store(true, Ordering::Relaxed);
        (*gp).casstatus(status::RUNNING, status::SYSCALL);
        (*mp).oldp = pp;
        (*mp).p = null_mut();
        (*pp).m.store(null_mut(), Ordering::Relaxed);
        // Release: everything this M did with the P happens before a
        // retaker's acquire compare-and-swap.
        (*pp).status.store(PSYSCALL, Ordering::Release);
    }
}

/// [`entersyscall`] for a call known to block (Go's `entersyscallblock`):
/// the P is handed off at once instead of waiting for sysmon.
///
/// # Safety
///
/// As [`entersyscall`].
pub(crate) unsafe fn entersyscallblock(gp: *mut G, mp: *mut M) {
    // SAFETY: the contract.
    unsafe {
        let sched = &*(*mp).rt;
        crate::trace::syscall_enter((*mp).p);
        syscalltick_bump((*mp).p);
        (*mp).insyscall.store(true, Ordering::Relaxed);
        (*gp).casstatus(status::RUNNING, status::SYSCALL);
        (*mp).oldp = null_mut();
        let pp = releasep(mp);
        // On g0: handoffp may start a thread.
        crate::systemstack(|| {
            if crate::proc::handoffp(sched, pp) {
                crate::proc::checkdead(sched);
            }
        });
    }
}

/// The G `gp` on `mp` is back from its call (Go's `exitsyscall`): it goes
/// on with a P — the one it had if it is still there, else an idle one,
/// else after waiting for one (`exitsyscall0`). Returns on `gp` with a P,
/// status `RUNNING`.
///
/// # Safety
///
/// `gp` is the caller, in a call entered by [`entersyscall`] or
/// [`entersyscallblock`] on `mp`.
pub(crate) unsafe fn exitsyscall(gp: *mut G, mp: *mut M) {
    // SAFETY: the contract.
    unsafe {
        let oldp = core::mem::replace(&mut (*mp).oldp, null_mut());
        if exitsyscallfast(mp, oldp) {
            (*gp).casstatus(status::SYSCALL, status::RUNNING);
            (*mp).insyscall.store(false, Ordering::Relaxed);
            return;
        }
        mcall(exitsyscall0);
        crate::trace::syscall_exit((*gp).m, gp);
        // A scheduler tearing down resumes its goroutines to unwind them
        // (crate::teardown): this one unwinds at its next park.
        crate::teardown::checkforce(gp, true);
    }
}

/// Takes a P for `mp` without waiting (Go's `exitsyscallfast`): `oldp` if
/// sysmon has not retaken it, else an idle P. The new time slice starts
/// here (`schedtick`): the call was not running.
///
/// # Safety
///
/// On `mp`'s thread, in a call, holding no P; `oldp` is the P it entered
/// the call with, or null.
#[inline(always)]
unsafe fn exitsyscallfast(mp: *mut M, oldp: *mut P) -> bool {
    // SAFETY: the contract; Ps live as long as their scheduler.
    unsafe {
        let pp = if !oldp.is_null()
            && (*oldp).status.load(Ordering::Relaxed) == PSYSCALL
            && (*oldp)
                .status
                .compare_exchange(PSYSCALL, PRUNNING, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            // The call kept its P: the trace has its entry only (see
            // crate::trace, "Blocking calls").
            wirep(mp, oldp);
            oldp
        } else {
            let sched = &*(*mp).rt;
            if sched.npidle.load(Ordering::Relaxed) == 0 {
                return false;
            }
            // Go's exitsyscallfast_pidle.
            let pp = pidleget(&mut sched.lock.lock(), sched);
            if pp.is_null() {
                return false;
            }
            acquirep(mp, pp);
            // Back from a call that lost its P. (No goroutine when a G
            // parked in its call: park_syscall_m's M leaves the call.)
            let gp = (*mp).curg;
            if !gp.is_null() {
                crate::trace::syscall_exit(mp, gp);
            }
            pp
        };
        let t = &(*pp).schedtick;
        t.store(t.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        true
    }
}

/// On g0: `gp` is back from its call and no P was free (Go's
/// `exitsyscall0`). A G bound to this M (the default, and every locked G)
/// waits here with its M for a P; an unbound G (migration) goes to the
/// global queue and the M stops.
///
/// # Safety
///
/// Only [`mcall`] calls it, from [`exitsyscall`].
unsafe extern "C" fn exitsyscall0(gp: *mut G) {
    // SAFETY: gp was in a call on this M and is now suspended; this M is
    // a scheduler M holding no P.
    unsafe {
        let mp = (*gp).m;
        let sched = &*(*mp).rt;
        (*gp).casstatus(status::SYSCALL, status::RUNNABLE);
        dropg(gp);
        if (*gp).boundm.is_null() {
            let pp = {
                let mut sl = sched.lock.lock();
                let pp = pidleget(&mut sl, sched);
                if pp.is_null() {
                    crate::proc::globrunqput(&mut sl, sched, gp);
                }
                // Under the lock: the G is queued or we hold a P.
                (*mp).insyscall.store(false, Ordering::SeqCst);
                pp
            };
            if !pp.is_null() {
                acquirep(mp, pp);
                execute_on(mp, (*mp).p, gp, false);
            }
            if !crate::proc::stopm(sched, mp) {
                crate::teardown::mexit(sched, mp);
            }
            crate::proc::schedule();
        }
        // Bound: wait for a P with the G, on mwantp.
        let got = {
            let mut sl = sched.lock.lock();
            if sched.stopping.load(Ordering::SeqCst) {
                (*mp).insyscall.store(false, Ordering::SeqCst);
                drop(sl);
                // The G is runnable and bound here: the teardown resumes
                // it to unwind.
                crate::teardown::mexit(sched, mp);
            }
            // SeqCst store before takep_or_wait, as its contract asks (the
            // G, our own, is runnable).
            (*mp).sleeping.store(crate::bound::IDLE, Ordering::SeqCst);
            let got = crate::bound::takep_or_wait(&mut sl, sched, mp);
            // Under the lock: we hold a P or wait on mwantp, which no idle
            // P coexists with, so checkdead cannot fire for us.
            (*mp).insyscall.store(false, Ordering::SeqCst);
            got
        };
        if !got {
            // Whoever takes us off mwantp sets nextp first (shutdown: null).
            // A kick (crate::cpu: work for an idle M) is not that: sleep on.
            crate::cpu::notesleep_woken(sched.platform, &(*mp).park);
            crate::lock_futex::noteclear(&(*mp).park);
            (*mp).sleeping.store(crate::bound::AWAKE, Ordering::Relaxed);
            let pp = core::mem::replace(&mut (*mp).nextp, null_mut());
            if pp.is_null() {
                crate::teardown::mexit(sched, mp);
            }
            acquirep(mp, pp);
        }
        execute_on(mp, (*mp).p, gp, false)
    }
}

/// Takes the P back if the current goroutine is (still) in a call: what
/// `blocking` and `call` do on the way out, also when `f` unwinds.
struct ExitOnDrop(*mut G);

impl Drop for ExitOnDrop {
    fn drop(&mut self) {
        let gp = self.0;
        // SAFETY: gp is the running G (the guard lives on its stack). A
        // park inside the call left it and came back in (insyscall), or,
        // if that unwound, left it for good: then there is nothing to do.
        unsafe {
            if (*gp).atomicstatus.load(Ordering::Relaxed) == status::SYSCALL {
                exitsyscall(gp, (*gp).m);
            }
        }
    }
}

/// Runs `f`, a call that blocks its thread (a system call, a C library, a
/// lock shared with plain threads), without holding up the other
/// goroutines: the goroutine's P goes to another thread at once (Go's
/// `entersyscallblock`), and when `f` returns the goroutine takes a P
/// again — the same one if it is free, any idle one, or it waits for one
/// — and goes on **on the same thread** (unless the runtime migrates
/// goroutines: then Go's way, on any thread).
///
/// For calls that are usually quick, [`call`] costs less: it keeps the P
/// unless the call lasts longer than a sysmon tick.
///
/// Defined for every caller: outside a goroutine (a plain thread, an M's
/// own stack), nested inside another `blocking` or `call`, or while the
/// goroutine is being torn down, `f` just runs. Inside `f`, a park (a
/// channel operation or lock that waits, `sleep`, `join`, `park`) or a
/// `gosched` takes a P for its duration, then gives it up again; `go`,
/// `spawn` and wake-ups work as anywhere. A panic in `f` goes on
/// unwinding after the goroutine has its P back. See [`crate::syscall`].
///
/// Goroutines that started on the same thread wait until `f` returns (a
/// started goroutine never changes threads, see [`crate::bound`]); a
/// goroutine that must stay responsive meanwhile should have a thread of
/// its own (`spawn_locked`).
///
/// # Example
///
/// ```
/// # #[cfg(feature = "std")] {
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::time::Duration;
///
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// let (now, most) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
/// let (n, m) = (now.clone(), most.clone());
/// rt.block_on(move || {
///     let hs: Vec<_> = (0..4)
///         .map(|_| {
///             let (now, most) = (n.clone(), m.clone());
///             gokernel::spawn(move || {
///                 gokernel::blocking(|| {
///                     most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
///                     std::thread::sleep(Duration::from_millis(50));
///                     now.fetch_sub(1, Ordering::SeqCst);
///                 })
///             })
///         })
///         .collect();
///     hs.into_iter().for_each(|h| h.join().unwrap());
/// })
/// .unwrap();
/// // One P, yet the calls overlapped: they do not hold it.
/// assert!(most.load(Ordering::SeqCst) > 1);
/// # }
/// ```
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    let gp = callable_g();
    if gp.is_null() {
        return f();
    }
    // SAFETY: a user G of a scheduler M holding a P, running; the guard
    // calls exitsyscall before anything else runs on this G (a park inside
    // f leaves the call first: insyscall).
    unsafe { entersyscallblock(gp, (*gp).m) };
    let _exit = ExitOnDrop(gp);
    f()
}

/// Runs `f`, a call that may block but usually returns quickly (Go's
/// `entersyscall` / `exitsyscall` around a system call): the P stays
/// with this goroutine, and comes back without any locking when `f`
/// returns soon (the fast path: about as costly as a function call and two
/// atomic operations), but if `f` lasts longer than a sysmon tick (20 µs
/// to 10 ms, see [`crate::sysmon`]) sysmon hands the P to another thread.
/// Otherwise as [`blocking`], which gives the P away at once.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "std")] {
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// let n = rt.block_on(|| {
///     // A write that usually does not block.
///     gokernel::syscall::call(|| {
///         use std::io::Write;
///         std::io::stderr().write(b"").unwrap()
///     })
/// });
/// assert_eq!(n, Ok(0));
/// # }
/// ```
pub fn call<T>(f: impl FnOnce() -> T) -> T {
    let gp = callable_g();
    if gp.is_null() {
        return f();
    }
    // SAFETY: as in blocking.
    unsafe { entersyscall(gp, (*gp).m) };
    let _exit = ExitOnDrop(gp);
    f()
}

/// [`gopark`](crate::proc::gopark) from inside a call: the G parks
/// without taking a P first — its caller may hold a lock (a channel's)
/// that the goroutine running on the only P is waiting for, so waiting
/// for a P here could deadlock. On g0 (`park_syscall_m`) the unlock
/// function runs as in `park_m`; if the G parks, its M leaves the call
/// (taking its old P or an idle one if it can, else sleeping as an idle
/// M) and schedules. The G, once readied, resumes with a P, and enters
/// the call again. If the unlock function says not to park, the G resumes
/// at once, still in the call.
///
/// # Safety
///
/// As [`gopark`](crate::proc::gopark), on a G in a call
/// ([`status::SYSCALL`]).
///
/// Out of line (and cold): inlined into `gopark`, it made `gopark` too
/// big to inline into its callers, a cost on every park.
#[cold]
#[inline(never)]
pub(crate) unsafe fn gopark_insyscall(unlockf: unsafe fn(*mut G, *mut ()) -> bool, lock: *mut ()) {
    let gp = crate::tls::getg();
    // SAFETY: the contract: the running G, in a call, on a scheduler M.
    unsafe {
        let mp = (*gp).m;
        (*mp).waitunlockf = Some(unlockf);
        (*mp).waitlock = lock;
        mcall(park_syscall_m);
        crate::teardown::checkforce(gp, true);
        // Readied and resumed with a P: back into the call.
        let mp = (*gp).m;
        if (*gp).atomicstatus.load(Ordering::Relaxed) == status::RUNNING && !(*mp).p.is_null() {
            entersyscallblock(gp, mp);
        }
    }
}

/// On g0: `gp`, in a call, parks (`park_m` for a G whose M holds no P).
///
/// # Safety
///
/// Only [`mcall`] calls it, from [`gopark_insyscall`].
unsafe extern "C" fn park_syscall_m(gp: *mut G) {
    crate::proc::stackcheck(gp);
    // SAFETY: gp was running in a call on this M and is now suspended.
    unsafe {
        let mp = (*gp).m;
        (*gp).casstatus(status::SYSCALL, status::WAITING);
        dropg(gp);
        if let Some(unlockf) = (*mp).waitunlockf.take() {
            let lock = core::mem::replace(&mut (*mp).waitlock, null_mut());
            if !unlockf(gp, lock) {
                // Not parking after all: back into the call, as it was.
                (*gp).casstatus(status::WAITING, status::SYSCALL);
                (*mp).curg = gp;
                (*gp).m = mp;
                crate::asm_amd64::gogo(&(*gp).sched);
            }
        }
        // The G is parked: this M is out of the call. Its old P if sysmon
        // has not taken it, or an idle one; else it sleeps as an idle M.
        let sched = &*(*mp).rt;
        let oldp = core::mem::replace(&mut (*mp).oldp, null_mut());
        let got = exitsyscallfast(mp, oldp);
        (*mp).insyscall.store(false, Ordering::SeqCst);
        if !got && !crate::proc::stopm(sched, mp) {
            crate::teardown::mexit(sched, mp);
        }
    }
    crate::proc::schedule()
}

/// Runs gokernel code that needs a P (a yield) from inside a call:
/// leaves the call (takes a P, or waits for one), runs `f`, and enters it
/// again as a blocking one. If `f` unwinds the goroutine stays out of the
/// call (the guard of `blocking` / `call` then has nothing to do).
///
/// # Safety
///
/// On the running user G, in a call ([`status::SYSCALL`]).
pub(crate) unsafe fn insyscall<T>(f: impl FnOnce() -> T) -> T {
    let gp = crate::tls::getg();
    // SAFETY: the contract.
    unsafe { exitsyscall(gp, (*gp).m) };
    let r = f();
    // SAFETY: back on gp with a P (f returned normally), status RUNNING;
    // the caller's guard exits the call again.
    unsafe {
        if !(*(*gp).m).p.is_null() {
            entersyscallblock(gp, (*gp).m);
        }
    }
    r
}
