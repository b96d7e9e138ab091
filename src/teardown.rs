//! What happens to goroutines that have not finished when their scheduler
//! shuts down ([`Sched::shutdown`], hosted: dropping a `Runtime`). Go has
//! no counterpart: a Go program's runtime lives until the process ends.
//!
//! # The rule
//!
//! No stack is freed while a frame on it is live. With unwinding (the
//! `std` feature and `panic = "unwind"`), every goroutine that has started
//! and not finished is unwound on the thread it runs on, so each of its
//! destructors runs exactly once and the locks it holds are released;
//! goroutines that never started have their closures dropped instead.
//! Without unwinding the stacks of started goroutines are leaked, and the
//! scheduler's memory with them (step 7).
//!
//! # How
//!
//! 1. `shutdown` sets `stopping` and wakes every sleeping M. An M finishes
//!    the goroutine it is running (up to its next yield, park or exit:
//!    a goroutine that never gets there delays the shutdown for good,
//!    unless it polls [`shutting_down`]) and comes here, `mexit`,
//!    instead of looking for work.
//! 2. A barrier: no M unwinds anything until every live M has arrived, so
//!    no goroutine of this scheduler runs user code any more except the
//!    ones being unwound, and none is in the middle of a wake-up from
//!    inside the runtime (`ready` and `Waiter::wakeup` do nothing once
//!    `stopping` is set), nor from outside its Ms (a plain thread's send:
//!    the barrier waits for those under way, `sema::ready_outside`).
//! 3. Each M then resumes, one at a time, the unfinished goroutines it
//!    owns (those bound to it; with migration, unbound ones are shared out
//!    by a claim on their status, which binds the goroutine to the M that
//!    made it, an `unlock_os_thread` notwithstanding, so that no other M
//!    claims it while it yields or exits):
//!    - a goroutine parked on a channel or sync object first has its
//!      sudogs taken off every queue (`sema::abandon`), so no waker can
//!      find it again and no queue keeps a pointer into its stack. If a
//!      waker had already completed its operation (a value handed over, a
//!      lock passed to it) it resumes normally and unwinds at its next
//!      park, so the value or the lock is not lost; otherwise its park
//!      returns by unwinding at once (`FORCE_NOW`);
//!    - any other parked or runnable goroutine resumes with
//!      `FORCE_NEXT`: its pending park (a sleep, `park`, a join) returns
//!      by unwinding, or, if it was runnable, it unwinds at its next park.
//!
//!    The unwinding carries a [`RuntimeDropped`] payload: `spawn`'s
//!    handle reports it from `join`, and the goroutine's entry ends
//!    quietly on it. Each resumed goroutine comes back here (it exited,
//!    or yielded on the way) and the M takes the next. On a locked M the
//!    goroutines that waited beside the locked one run too, then: their
//!    `lock_os_thread` / `unlock_os_thread` leave its lock alone
//!    (`beside_locked`).
//! 4. A park while being unwound (a destructor that waits on a channel or
//!    a lock, or sleeps) is a fatal error naming the goroutine: it could
//!    only wait for goroutines that are being torn down too, and unwinding
//!    a second time from inside a destructor would abort anyway. A
//!    goroutine that catches the unwinding and carries on is unwound again
//!    at its next park.
//! 5. An M whose thread is itself unwinding a panic (some goroutine of it
//!    parked in the middle of unwinding one, in a destructor) cannot start
//!    another unwind there: std would abort. Its unfinished goroutines are
//!    left as they are and their stacks leaked — the one case where a
//!    dropped runtime leaks instead of unwinding (and then the scheduler
//!    is leaked with them, step 7). A thread counts as
//!    unwinding also while one of its goroutines that the teardown is
//!    unwinding has yielded on the way (a destructor that calls `gosched`):
//!    the M resumes that one, which starts no new unwind, and once it has
//!    finished goes on with the rest. (A goroutine being unwound is bound
//!    to its thread even with `migrate_started_goroutines`: its unwinding
//!    is the thread's.)
//! 6. When the last M has exited, `Drop for Sched` drops the closures of
//!    goroutines that never started and frees the stacks of finished ones;
//!    any other stack is leaked. It first takes every goroutine still
//!    parked off the queues it waits on, before any closure is dropped:
//!    a closure's destructor is user code, and one that panics must not
//!    leave a queue pointing at a goroutine freed with the scheduler
//!    (`release_gs`).
//! 7. A goroutine left unfinished (step 5, or every started one in a
//!    build that does not unwind) may still be pointed at from outside
//!    the scheduler: a channel or lock it waits on, the poll descriptor
//!    of a socket another handle can close, a `Goroutine` handle. Then
//!    the scheduler is never freed (`keep_if_leaked`): those wake-ups
//!    find it stopped and do nothing. Only the closures of goroutines
//!    that never started are dropped. Such a goroutine never finishes: a
//!    `JoinHandle::join` of it waits for good, and so does a `lock` of a
//!    `Mutex` it holds (or a `call_once` of a `Once` it runs).

use core::sync::atomic::Ordering;

use crate::runtime2::{G, M, Sched, status};

/// `G::force`: nothing to do.
pub(crate) const FORCE_NONE: u8 = 0;
/// `G::force`: its next park unwinds instead of parking.
pub(crate) const FORCE_NEXT: u8 = 1;
/// `G::force`: the park it is resumed from returns by unwinding.
pub(crate) const FORCE_NOW: u8 = 2;
/// `G::force`: it is being unwound; a park now is fatal.
pub(crate) const FORCE_UNWINDING: u8 = 3;

/// The payload of the unwinding that tears down a goroutine whose runtime
/// was dropped: what `JoinHandle::join` (hosted)
/// returns (`Err`, downcastable to this type) for a goroutine that never
/// finished.
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// let h = rt.spawn(gokernel::park); // parks for good
/// drop(rt);
/// let err = h.join().unwrap_err();
/// assert!(err.downcast_ref::<gokernel::RuntimeDropped>().is_some());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeDropped;

impl core::fmt::Display for RuntimeDropped {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("the goroutine's runtime was dropped before it finished")
    }
}

#[cfg(feature = "std")]
impl std::error::Error for RuntimeDropped {}

/// Whether the runtime of the calling goroutine has begun to shut down
/// (hosted: its `Runtime` is being dropped; bare metal:
/// [`Sched::shutdown`](crate::runtime2::Sched::shutdown) was called).
/// `false` outside a goroutine.
///
/// A shutdown waits for each running goroutine to reach its next yield,
/// park or exit. A goroutine that computes for long without any of those
/// can poll this to stop early, so that the drop does not wait for it;
/// one that parks or yields needs nothing of the kind (its park or yield
/// unwinds it).
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// let started = Arc::new(AtomicBool::new(false));
/// let s = started.clone();
/// let h = rt.spawn(move || {
///     s.store(true, Ordering::SeqCst);
///     let mut rounds = 0u64;
///     // Never parks nor yields: without the poll, the drop would wait
///     // here for good.
///     while !gokernel::shutting_down() {
///         rounds = rounds.wrapping_add(1);
///     }
///     rounds
/// });
/// while !started.load(Ordering::SeqCst) {
///     std::thread::yield_now();
/// }
/// drop(rt);
/// assert!(h.join().is_ok(), "it returned on its own");
/// ```
pub fn shutting_down() -> bool {
    let gp = crate::proc::current_user_g();
    if gp.is_null() {
        return false;
    }
    // SAFETY: a user G that is running has a live M whose scheduler (the
    // M's `rt`, non-null: current_user_g checked) outlives its Ms.
    unsafe { (*(*(*gp).m).rt).stopping.load(Ordering::SeqCst) }
}

/// Whether this build unwinds goroutines at shutdown (else it leaks their
/// stacks).
pub(crate) const UNWINDS: bool = cfg!(all(feature = "std", panic = "unwind"));

/// At a park of `gp` (before it parks: `after` false; when it is resumed:
/// true): unwinds if the teardown asked for it.
///
/// # Safety
///
/// `gp` is the running G (the caller).
#[inline]
pub(crate) unsafe fn checkforce(gp: *mut G, after: bool) {
    // SAFETY: the contract: only the G's own M writes `force`, while the
    // G is not running.
    let f = unsafe { (*gp).force };
    if f == FORCE_NONE || (after && f == FORCE_NEXT) {
        return;
    }
    // SAFETY: as above.
    unsafe { forceunwind(gp, f) }
}

/// Unwinds the running G `gp` for the teardown (or, if it is already
/// being unwound, ends the process naming it).
///
/// # Safety
///
/// `gp` is the running G (the caller), and `f` its `force`, not
/// `FORCE_NONE`.
#[cold]
unsafe fn forceunwind(gp: *mut G, f: u8) {
    // Parked again after the teardown began unwinding it: from a
    // destructor of that unwinding (still under way on this thread), or
    // after a `catch_unwind` caught it, which is unwound again.
    if f == FORCE_UNWINDING && thread_panicking() {
        crate::panic::throw_g(
            "a goroutine parked while it was being unwound because its runtime \
             was dropped (a destructor waited on a channel, a lock, a sleep or a \
             join)",
            gp,
        );
    }
    // SAFETY: the contract: the running G, on its M.
    unsafe {
        (*gp).force = FORCE_UNWINDING;
        // From here its unwinding is under way on this thread (std counts
        // it in the thread's panic count): if a destructor yields, the G
        // must resume here. A migrating scheduler binds it, as
        // lock_os_thread does; goexit0 unbinds it.
        crate::bound::bind_if_unbound(gp, (*gp).m);
    }
    #[cfg(all(feature = "std", panic = "unwind"))]
    std::panic::resume_unwind(alloc::boxed::Box::new(RuntimeDropped));
    #[cfg(not(all(feature = "std", panic = "unwind")))]
    crate::panic::throw_g("forced unwind without unwinding support", gp);
}

/// On g0 of `mp`, an M of `sched` that is stopping and holds no G to run:
/// waits for every M to stop, then unwinds this M's unfinished goroutines
/// one by one, then ends the M (see the module docs). Never returns.
///
/// # Safety
///
/// On g0 of `mp`, with `sched.stopping` set and no G of this M running.
pub(crate) unsafe fn mexit(sched: &Sched, mp: *mut M) -> ! {
    // SAFETY: the contract.
    unsafe {
        if !(*mp).p.is_null() {
            let pp = crate::proc::releasep(mp);
            crate::proc::pidleput(&mut sched.lock.lock(), sched, pp);
        }
        if !(*mp).tornup {
            (*mp).tornup = true;
            barrier(sched);
        }
        // See step 5: starting an unwind here would abort. But a victim
        // that yielded in the middle of its own unwinding (a destructor
        // that called `gosched`) is why this thread counts as panicking:
        // resuming it starts nothing, and lets it finish.
        let victim = if UNWINDS {
            nextvictim(sched, mp, thread_panicking())
        } else {
            None
        };
        if let Some((gp, from)) = victim {
            prepare(gp, from);
            crate::proc::execute_on(mp, (*mp).p, gp, false);
        }
        crate::trace::mexit(mp);
        crate::proc::mend(mp)
    }
}

/// Whether `gp` was resumed by its runtime's teardown (it is being
/// unwound, or runs on to the park that will unwind it): then it stays
/// bound to its thread, an unlock notwithstanding. One being unwound must
/// finish there (see `forceunwind`); any other must not become free to
/// move while the teardown's threads claim unbound goroutines by their
/// status (`nextvictim`): its next yield would make it claimable before
/// its thread has switched it out.
///
/// # Safety
///
/// `gp` is the running G (the caller) or was just on its M.
#[inline]
pub(crate) unsafe fn resumed(gp: *mut G) -> bool {
    // SAFETY: the contract: only the G's own M writes `force`.
    unsafe { (*gp).force != FORCE_NONE }
}

/// Whether `gp`, running on `mp`, runs beside the G locked to `mp`: only
/// while the teardown resumes the goroutines of a locked M one after the
/// other (a locked M runs nothing else otherwise). Such a goroutine's
/// `lock_os_thread` and `unlock_os_thread` do nothing: the lock fields of
/// the M (its nesting count, its locked G) are the locked goroutine's,
/// and the thread runs nothing else after the teardown.
///
/// # Safety
///
/// `gp` is the running G (the caller), on `mp`.
#[inline]
pub(crate) unsafe fn beside_locked(gp: *mut G, mp: *mut M) -> bool {
    // SAFETY: the contract: only this M's own Gs and g0 touch its lock
    // fields.
    let lockedg = unsafe { (*mp).lockedg };
    !lockedg.is_null() && lockedg != gp
}

/// Whether this thread is unwinding a panic (some goroutine of it is
/// parked in the middle of one).
fn thread_panicking() -> bool {
    #[cfg(feature = "std")]
    return std::thread::panicking();
    #[cfg(not(feature = "std"))]
    false
}

/// Step 2: counts this M in and waits until every live M is in.
fn barrier(sched: &Sched) {
    let tp = &sched.teardown;
    // SeqCst: the count and nmlive are compared by every arrival.
    tp.arrived.fetch_add(1, Ordering::SeqCst);
    loop {
        if tp.go.load(Ordering::SeqCst) {
            return;
        }
        // Ms started during the shutdown count in nmlive before their
        // thread runs, and arrive here like the others.
        if tp.arrived.load(Ordering::SeqCst) >= sched.nmlive.load(Ordering::SeqCst) {
            // A wake-up from outside the Ms that got past its `stopping`
            // check finishes before any goroutine is claimed: it would
            // otherwise store RUNNABLE and queue a G the teardown resumed
            // meanwhile (see crate::sema::ready_outside). SeqCst: pairs
            // with its count; one that starts after this sees `stopping`.
            let mut spins = 0;
            while tp.outside.load(Ordering::SeqCst) != 0 {
                crate::sema::backoff(&mut spins);
            }
            tp.go.store(true, Ordering::SeqCst);
            tp.wake.fetch_add(1, Ordering::SeqCst);
            // i32::MAX: Linux reads the count as an int (u32::MAX would be -1:
            // one waiter).
            sched.platform.futexwakeup(&tp.wake, i32::MAX as u32);
            return;
        }
        let seen = tp.wake.load(Ordering::SeqCst);
        if tp.go.load(Ordering::SeqCst) {
            return;
        }
        sched.platform.futexsleep(&tp.wake, seen, None);
    }
}

/// The next unfinished goroutine `mp` should unwind, claimed (its status
/// is `RUNNING` until `prepare` makes it runnable), and the status it was
/// claimed from; `None` when there is none left. With `unwinding`, only a
/// runnable one already being unwound (it yielded on the way).
///
/// # Safety
///
/// On g0 of `mp`, after the barrier.
unsafe fn nextvictim(sched: &Sched, mp: *mut M, unwinding: bool) -> Option<(*mut G, u32)> {
    let all = sched.allgs.lock();
    for &gp in all.iter() {
        // SAFETY: Gs in allgs are live while listed (we hold the list);
        // after the barrier only the M that claims a G touches it.
        unsafe {
            let st = &(*gp).atomicstatus;
            let from: &[u32] = if unwinding {
                &[status::RUNNABLE]
            } else {
                &[status::WAITING, status::RUNNABLE]
            };
            // The status first: `boundm` is read only of a G that no M
            // runs (one running may bind or unbind itself meanwhile).
            // Acquire: pairs with the store that made it runnable or
            // waiting.
            if !from.contains(&st.load(Ordering::Acquire)) {
                continue;
            }
            let bm = (*gp).boundm;
            let mine = bm == mp || (bm.is_null() && sched.migrate);
            if !mine || (*gp).startfn.is_set() {
                continue;
            }
            for &old in from {
                // The claim: with migration, several Ms look at the same
                // unbound Gs.
                if st
                    .compare_exchange(old, status::RUNNING, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    // `force` is read only once the G is ours (another M
                    // may be running it until the claim).
                    if unwinding && (*gp).force != FORCE_UNWINDING {
                        st.store(old, Ordering::Release);
                        break;
                    }
                    // Ours until it exits: `prepare` makes it runnable
                    // before this M runs it, and its yields make it
                    // runnable before its M has switched it out (gosched_m
                    // stores the status before dropg); an unbound G (with
                    // migration) would be claimed by another M then and
                    // run on two threads at once. Bound, only this M
                    // claims it again (written under the list's lock,
                    // which every other claimant holds to read it).
                    crate::bound::bind_if_unbound(gp, mp);
                    return Some((gp, old));
                }
            }
        }
    }
    None
}

/// Step 7, at the end of [`Sched::shutdown`] (every M gone): if a
/// goroutine that started was left unfinished (step 5, or a build that
/// does not unwind), keeps the scheduler for good — its Gs, Ps and Ms —
/// by leaking a reference to it. Whatever still points at such a
/// goroutine (a channel's queue, a socket's poll descriptor that another
/// handle may close, a parker) then finds a stopped scheduler, whose
/// wake-ups do nothing, instead of freed memory. The closures of the
/// goroutines that never started are dropped here instead (their handles
/// report [`RuntimeDropped`]), each claimed first (runnable to dead) so
/// that a second shutdown drops none twice.
pub(crate) fn keep_if_leaked(sched: &Sched) {
    let unstarted = {
        let all = sched.allgs.lock();
        // SAFETY: a listed G is live; only atomics are read.
        let leaked = all.iter().any(|&gp| unsafe { (*gp).started_unfinished() });
        if !leaked {
            return;
        }
        if let Some(me) = sched.self_weak.upgrade() {
            core::mem::forget(me);
        }
        all.iter()
            .copied()
            .filter(|&gp| {
                // SAFETY: as above. No M runs (every one is gone) and the
                // scheduler is stopping, so nothing takes a runnable G off
                // its queue again; the claim makes it ours.
                let g = unsafe { &*gp };
                g.startfn.is_set()
                    && g.atomicstatus
                        .compare_exchange(
                            status::RUNNABLE,
                            status::DEAD,
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        )
                        .is_ok()
            })
            .collect::<alloc::vec::Vec<_>>()
    };
    // Outside the list's lock: the closures' destructors are user code.
    // SAFETY: claimed above: ours alone, and never run.
    drop_each(&unstarted, |gp| unsafe { (*gp).startfn.clear() });
}

/// [`Sched::shutdown`] called on one of `sched`'s own threads (by one of
/// its goroutines, or on an M's system stack: a timer callback, a
/// `systemstack` closure) would wait for every M to exit, its own
/// included: a fatal error naming the goroutine, rather than a silent
/// hang. (Dropping a `Runtime` there shuts down from a thread of its own.)
pub(crate) fn refuse_shutdown_on_own_thread(sched: &Sched) {
    if core::ptr::eq(crate::runtime2::current_sched(), sched) {
        crate::panic::throw_on_system_stack(
            "Sched::shutdown called on one of the scheduler's own threads: it would wait for \
             itself to exit; call it from another thread (dropping a Runtime does)",
        );
    }
}

/// Calls `drop` on each of `gs`, going on with the others if one unwinds
/// (a second unwinding aborts: a panic during a panic), as a slice's drop
/// does.
fn drop_each(gs: &[*mut G], drop: impl Fn(*mut G)) {
    struct Rest<'a, F: Fn(*mut G)> {
        gs: &'a [*mut G],
        next: usize,
        drop: F,
    }
    impl<F: Fn(*mut G)> Rest<'_, F> {
        fn run(&mut self) {
            while let Some(&gp) = self.gs.get(self.next) {
                self.next += 1; // past it first: each is dropped once
                (self.drop)(gp);
            }
        }
    }
    impl<F: Fn(*mut G)> Drop for Rest<'_, F> {
        fn drop(&mut self) {
            self.run(); // only left to do if `run` below unwound
        }
    }
    Rest { gs, next: 0, drop }.run();
}

/// Step 6, for `Drop for Sched`: unlinks every parked G from whatever it
/// waits on, frees the stacks of the Gs that are done (leaks the others),
/// then drops the Gs (the closures of those that never started: user
/// code). In that order, so that no user code runs while a queue still
/// points at a G about to be freed: a destructor that panics leaves the
/// other Gs dropped just the same (and a second panic aborts, as for a
/// slice), never a G freed under a channel's queue.
///
/// # Safety
///
/// `gs` are the Gs of a scheduler being dropped, made by
/// `gslab::galloc`; no M runs any of them, and their slab is freed after
/// this.
pub(crate) unsafe fn release_gs(gs: &[*mut G]) {
    // The stacks of the Gs that are done, freed together.
    let mut stacks = crate::stack::FreeBatch::new();
    for &gp in gs {
        // SAFETY: the contract. A G parked on a channel or sync object has
        // sudogs on that object's queues, in its stack, and one parked on
        // a poller source is named by the source's slot: unlink them.
        unsafe {
            if (*gp).readgstatus() == status::WAITING {
                crate::netpoll::netpollabandon(gp);
                let w = (*gp).waiting;
                if !w.is_null() {
                    crate::sema::abandon(w);
                }
            }
            let g = &mut *gp;
            if g.started_unfinished() {
                // Started and not finished: frames on its stack are live
                // (the teardown could not unwind it, or this build does
                // not unwind). The stack is leaked, never freed under them.
                core::mem::forget(g.stackmem.take());
            } else if let Some(mem) = g.stackmem.take() {
                stacks.push(mem);
            }
        }
    }
    drop(stacks);
    // SAFETY: the contract; each G is dropped once.
    drop_each(gs, |gp| unsafe { gp.drop_in_place() });
}

/// Step 3 for a claimed victim: takes it off every wait queue and decides
/// how it resumes; leaves it runnable.
///
/// # Safety
///
/// `gp` was just claimed by [`nextvictim`], from status `from`.
unsafe fn prepare(gp: *mut G, from: u32) {
    // SAFETY: the contract: the G is ours, parked or runnable.
    unsafe {
        let w = (*gp).waiting;
        let mut force = if (*gp).force == FORCE_NONE {
            FORCE_NEXT
        } else {
            (*gp).force
        };
        if from == status::WAITING && !w.is_null() {
            crate::sema::abandon(w);
            if !crate::sema::completed(w) {
                // Nobody can complete its wait now: the park unwinds.
                force = FORCE_NOW;
            }
        } else if from == status::WAITING {
            // A park with no waiter (a sleep, park(), a join): nothing was
            // handed to it that unwinding would lose.
            force = FORCE_NOW;
        }
        if (*gp).force != FORCE_UNWINDING {
            (*gp).force = force;
        }
        (*gp)
            .atomicstatus
            .store(status::RUNNABLE, Ordering::Release);
    }
}
