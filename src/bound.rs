//! Where started goroutines run: each on the M (hosted: the OS thread) it
//! started on. Go has no such rule; see the essay in
//! [`proc`](crate::proc#where-goroutines-run) for why gokernel does, and
//! how it keeps Go's wake-up guarantees.
//!
//! # The pieces
//!
//! - `G::boundm`: the M a G must run on. `execute` sets it the first time
//!   a G runs, unless the scheduler migrates (`Sched::migrate`, the
//!   `unsafe` opt-in); `lock_os_thread` sets it in either mode. `goexit0`
//!   clears it. A G with a null `boundm` goes on P run queues and the
//!   global queue as in Go, and may be stolen; a bound G never does.
//! - Each M's own queue: `boundnext` (like a P's `runnext`) and `boundq`,
//!   touched only by the M's thread, and `inbox`, where other threads put
//!   the M's Gs they make runnable (`readyhome`).
//! - `M::sleeping` says whether the M sleeps without a P, and where:
//!   `IDLE` (in `stopm`, on the idle list or waiting for a P), `LOCKED`
//!   (in `stoplockedm`, waiting for its locked G), `TIMER` (the timer
//!   sleeper in `timersleep`).
//! - `SchedLocked::mwantp`: Ms with runnable bound Gs and no P. A P that
//!   becomes idle goes to one of them first (`pidleput`), and an M holding
//!   a P gives it to one at its next scheduling point (`handoff_wanted`),
//!   at once if it has no bound Gs of its own to run, after a time slice
//!   of `WANTP_SLICE_NS` otherwise. So `npidle > 0` implies `mwantp` is
//!   empty, under the lock.
//!
//! # No lost wake-up
//!
//! A waker on another thread publishes the G (in `inbox`, counted in
//! `ninbox`; for a locked G, its status) and then reads the M's
//! `sleeping`; the M stores `sleeping` and then reads `ninbox` (or its
//! locked G's status) before it sleeps. All four are sequentially
//! consistent, so one side sees the other: either the waker sees the M
//! asleep (or about to be) and wakes it (`wakehome`), or the M sees the
//! G and does not sleep. The M makes that check under `Sched::lock`, and
//! the waker acts on what it read under the same lock, so it finds the M
//! either still awake or fully on its list.

use core::ptr::null_mut;
use core::sync::atomic::{Ordering, fence};

use crate::lock_futex::notewakeup;
use crate::runtime2::{G, GQueue, M, Sched, SchedLocked, status};

/// `M::sleeping`: the M is running, or on its way to sleep (it checks its
/// queues again before it does).
pub(crate) const AWAKE: u32 = 0;
/// `M::sleeping`: in `stopm`, on the idle list or on `mwantp`.
pub(crate) const IDLE: u32 = 1;
/// `M::sleeping`: in `stoplockedm`, waiting for its locked G.
pub(crate) const LOCKED: u32 = 2;
/// `M::sleeping`: the timer sleeper (`time::timersleep`).
pub(crate) const TIMER: u32 = 3;

/// How long an M with bound Gs of its own keeps its P while another M
/// waits for one: 1 ms.
pub(crate) const WANTP_SLICE_NS: u64 = 1_000_000;

/// Puts `gp`, bound to `mp`, on `mp`'s own queue: `boundnext` if `next`
/// (the G it displaces goes to the tail), else the tail.
///
/// # Safety
///
/// On `mp`'s thread; `gp` is runnable, bound to `mp` and on no queue.
#[inline]
pub(crate) unsafe fn boundput(mp: *mut M, gp: *mut G, next: bool) {
    // SAFETY: the contract: the queue is this thread's own.
    unsafe {
        let gp = if next {
            core::mem::replace(&mut (*mp).boundnext, gp)
        } else {
            gp
        };
        if !gp.is_null() {
            gqueue_push(&mut (*mp).boundq, gp);
        }
    }
}

/// Takes `mp`'s `boundnext`, or null.
///
/// # Safety
///
/// On `mp`'s thread.
#[inline]
pub(crate) unsafe fn boundnextget(mp: *mut M) -> *mut G {
    // SAFETY: the contract.
    unsafe {
        let gp = (*mp).boundnext;
        // No store when it is empty, as it is at most scheduling points.
        if !gp.is_null() {
            (*mp).boundnext = null_mut();
        }
        gp
    }
}

/// Takes the head of `mp`'s own queue (after moving in what other threads
/// put in its inbox), or null.
///
/// # Safety
///
/// On `mp`'s thread.
#[inline(always)]
pub(crate) unsafe fn boundqget(mp: *mut M) -> *mut G {
    // SAFETY: the contract.
    unsafe {
        // Relaxed: a stale zero only delays the G to the next round; the
        // M reads it again, SeqCst, before it sleeps.
        if (*mp).ninbox.load(Ordering::Relaxed) != 0 {
            inboxdrain(mp);
        }
        gqueue_pop(&mut (*mp).boundq)
    }
}

/// Moves `mp`'s inbox to the tail of its own queue.
///
/// # Safety
///
/// On `mp`'s thread.
#[cold]
unsafe fn inboxdrain(mp: *mut M) {
    // SAFETY: the contract; the inbox is under its lock.
    unsafe {
        let mut inbox = (*mp).inbox.lock();
        let q = &mut (*mp).boundq;
        if !inbox.head.is_null() {
            if q.tail.is_null() {
                q.head = inbox.head;
            } else {
                (*q.tail).schedlink = inbox.head;
            }
            q.tail = inbox.tail;
            q.size += inbox.size;
            *inbox = GQueue::new();
        }
        // Under the inbox lock, after taking everything: a later push
        // counts from zero again.
        (*mp).ninbox.store(0, Ordering::Relaxed);
    }
}

/// Whether `mp` has a runnable bound G queued (not counting a locked G,
/// which is on no queue). SeqCst: the M's half of the wake-up argument in
/// the module docs.
///
/// # Safety
///
/// On `mp`'s thread.
pub(crate) unsafe fn has_bound_work(mp: *mut M) -> bool {
    // SAFETY: the contract.
    unsafe {
        !(*mp).boundnext.is_null()
            || (*mp).boundq.size != 0
            || (*mp).ninbox.load(Ordering::SeqCst) != 0
    }
}

/// `gp`, bound to `mp` (not the caller's M), became runnable on another
/// thread: puts it in `mp`'s inbox and makes sure `mp` will run it.
///
/// # Safety
///
/// `gp` is runnable, bound to `mp` (an M of `sched`), not locked, and on
/// no queue.
pub(crate) unsafe fn readyhome(sched: &Sched, mp: *mut M, gp: *mut G) {
    // SAFETY: the contract; the inbox is under its lock.
    unsafe {
        {
            let mut inbox = (*mp).inbox.lock();
            gqueue_push(&mut inbox, gp);
            // SeqCst: the waker's half of the wake-up argument.
            (*mp).ninbox.fetch_add(1, Ordering::SeqCst);
        }
        wakehome(sched, mp, false);
    }
}

/// `gp`, locked to `mp`, was made runnable (its status is `RUNNABLE`
/// already): wakes `mp` if it sleeps waiting for it.
///
/// # Safety
///
/// `gp` is locked to `mp`, an M of `sched`.
pub(crate) unsafe fn readylocked(sched: &Sched, mp: *mut M) {
    // SeqCst fence after the status change: pairs with stoplockedm's
    // store of `sleeping` and load of the status.
    fence(Ordering::SeqCst);
    // SAFETY: the contract.
    unsafe { wakehome(sched, mp, true) }
}

/// Wakes `mp` for a G of its that became runnable, if `mp` sleeps: gives
/// it an idle P, or queues it on `mwantp` when no P is idle. `locked`:
/// the G is `mp`'s locked G (else one on its queues).
///
/// # Safety
///
/// `mp` is an M of `sched`.
unsafe fn wakehome(sched: &Sched, mp: *mut M, locked: bool) {
    // SAFETY: Ms live as long as their scheduler; `sleeping` is atomic,
    // the other fields are under the lock.
    unsafe {
        match (*mp).sleeping.load(Ordering::SeqCst) {
            AWAKE => {}
            TIMER => crate::time::netpollbreak(sched),
            _ => {
                let mut sl = sched.lock.lock();
                if (*mp).onmidle {
                    mremove(&mut sl, mp);
                    givep(&mut sl, sched, mp);
                } else if locked && (*mp).lockedsleep && locked_runnable((*mp).lockedg) {
                    // The status is read again under the lock: this waker
                    // may be late. Its G can have been seen runnable by
                    // the M itself (stoplockedm's check), run, and parked
                    // again since, and the M now sleeps for that later
                    // park: waking it then would run a waiting G (seen in
                    // the reference kernel on 2 and 4 CPUs: `status was
                    // waiting, expected runnable`). The later park's waker
                    // wakes it; a runnable G here is one nobody ran.
                    (*mp).lockedsleep = false;
                    sl.nmidlelocked -= 1;
                    givep(&mut sl, sched, mp);
                }
            }
        }
    }
}

/// Gives sleeping `mp` (on no list) an idle P and wakes it, or puts it on
/// `mwantp` to wait for one. Under the lock.
///
/// # Safety
///
/// `mp` sleeps (or is about to, on its note) with no P and is on no list.
pub(crate) unsafe fn givep(sl: &mut SchedLocked, sched: &Sched, mp: *mut M) {
    let pp = crate::proc::pidleget(sl, sched);
    if pp.is_null() {
        wantpput(sl, sched, mp);
    } else {
        // SAFETY: the contract; nextp is read by mp after its note is
        // woken.
        unsafe {
            (*mp).nextp = pp;
            notewakeup(sched.platform, &(*mp).park);
        }
    }
}

/// `mp`, which holds no P, has a G of its own to run (only it can):
/// takes an idle P (true), or else goes on `mwantp` to wait for one
/// (false: the caller sleeps on its note). Under the lock.
///
/// # Safety
///
/// On `mp`'s thread, with `mp.sleeping` already stored (SeqCst) and the
/// G found runnable after that.
pub(crate) unsafe fn takep_or_wait(sl: &mut SchedLocked, sched: &Sched, mp: *mut M) -> bool {
    // SAFETY: the contract: mp is ours, and the field is under the lock.
    // Holding a P or on mwantp from here on (ms_at_work).
    unsafe { (*mp).handoffwork = false };
    let pp = crate::proc::pidleget(sl, sched);
    if pp.is_null() {
        wantpput(sl, sched, mp);
        return false;
    }
    // SAFETY: the contract: mp is ours and holds no P; pp came off the
    // idle list.
    unsafe {
        (*mp).sleeping.store(AWAKE, Ordering::Relaxed);
        crate::proc::acquirep(mp, pp);
    }
    true
}

/// Puts `mp`, which has runnable bound Gs and no P, on `mwantp`. Under
/// the lock, with no P idle.
pub(crate) fn wantpput(sl: &mut SchedLocked, sched: &Sched, mp: *mut M) {
    // SAFETY: mp is on no list; the list is under the lock.
    unsafe { (*mp).schedlink = sl.mwantp };
    sl.mwantp = mp;
    sched.nmwantp.fetch_add(1, Ordering::Relaxed);
}

/// Takes an M off `mwantp`, or null. Under the lock.
pub(crate) fn wantpget(sl: &mut SchedLocked, sched: &Sched) -> *mut M {
    let mp = sl.mwantp;
    if !mp.is_null() {
        // SAFETY: mp is on the list, which the lock guards.
        unsafe { sl.mwantp = (*mp).schedlink };
        sched.nmwantp.fetch_sub(1, Ordering::Relaxed);
    }
    mp
}

/// Takes `mp` off the idle M list. Under the lock.
pub(crate) fn mremove(sl: &mut SchedLocked, mp: *mut M) {
    // SAFETY: the list is under the lock; mp is on it (`onmidle`).
    unsafe {
        let mut link: *mut *mut M = &mut sl.midle;
        while !(*link).is_null() {
            if *link == mp {
                *link = (*mp).schedlink;
                (*mp).schedlink = null_mut();
                (*mp).onmidle = false;
                return;
            }
            link = &mut (**link).schedlink;
        }
    }
    crate::panic::throw("mremove: the M is not on the idle list");
}

/// At a scheduling point of `mp`, which holds a P while Ms wait on
/// `mwantp`: gives the P to the first of them if `mp` has no bound G of
/// its own to run, or has held the P for [`WANTP_SLICE_NS`]. Returns true
/// when it gave the P away (`mp` then holds none).
///
/// # Safety
///
/// On g0 of `mp`, an M of `sched` holding a P and no locked G.
pub(crate) unsafe fn handoff_wanted(sched: &Sched, mp: *mut M) -> bool {
    // SAFETY: the contract.
    unsafe {
        // A spinning M (just started or woken to look for work) looks
        // first: it counts in nmspinning, which wakep relies on.
        if (*mp).spinning {
            return false;
        }
        if has_bound_work(mp)
            && sched.platform.nanotime().saturating_sub((*mp).pwhen) < WANTP_SLICE_NS
        {
            return false;
        }
        let mut sl = sched.lock.lock();
        let wm = wantpget(&mut sl, sched);
        if wm.is_null() {
            return false;
        }
        let pp = crate::proc::releasep(mp);
        // Gs of our own still queued (boundnext, boundq: ours only) make
        // us at work until stopm, under the lock, has us hold a P again or
        // wait on mwantp (takep_or_wait clears it): see ms_at_work.
        (*mp).handoffwork = !(*mp).boundnext.is_null() || (*mp).boundq.size != 0;
        (*wm).nextp = pp;
        notewakeup(sched.platform, &(*wm).park);
    }
    true
}

/// Appends `gp` to `q`.
pub(crate) fn gqueue_push(q: &mut GQueue, gp: *mut G) {
    // SAFETY: gp is owned by the caller and goes on q, which the caller
    // holds.
    unsafe { (*gp).schedlink = null_mut() };
    if q.tail.is_null() {
        q.head = gp;
    } else {
        // SAFETY: the tail is on q.
        unsafe { (*q.tail).schedlink = gp };
    }
    q.tail = gp;
    q.size += 1;
}

/// Takes the head of `q`, or null.
pub(crate) fn gqueue_pop(q: &mut GQueue) -> *mut G {
    let gp = q.head;
    if !gp.is_null() {
        // SAFETY: gp is on q.
        unsafe {
            q.head = (*gp).schedlink;
            (*gp).schedlink = null_mut();
        }
        if q.head.is_null() {
            q.tail = null_mut();
        }
        q.size -= 1;
    }
    gp
}

/// Whether an M of `sched` that holds no P is at work (`checkdead`'s
/// question, asked holding `_sl`, the scheduler lock, with every P idle):
/// on its way to sleep with a bound G of its own made runnable meanwhile
/// (in its inbox, or its locked G), for which it takes a P in stopm or
/// stoplockedm; on its way there from `handoff_wanted` with bound Gs of
/// its own still queued (`handoffwork`); or running a goroutine in a call
/// (crate::syscall).
///
/// # Why `handoffwork` closes the gap
///
/// `handoff_wanted` gives the P straight to an M on `mwantp`, so no P goes
/// idle then; but that M, and the others, may idle every P before this M
/// reaches stopm, where it takes a P back for its queued Gs or waits on
/// `mwantp` (which no idle P coexists with). Before this flag, `checkdead`
/// in that gap saw nothing of those Gs (their queue is this M's alone, and
/// `ninbox` is zero) and `block_on` returned `Err(Deadlock)` with a G
/// runnable (seen with a delay put in the gap: a dump at the report showed
/// it `runnable`). The flag is set in the critical section of the lock
/// that releases the P and cleared in the one that takes a P or joins
/// `mwantp` (`takep_or_wait`); `checkdead` reads it holding the same lock.
/// So every `checkdead` sees this M holding its P, flagged, holding a P
/// again or on `mwantp` (no P idle): never idle Ps and the Gs unseen. The
/// queue itself is read only by its owner, when it sets the flag. An M
/// that finds the scheduler stopping in stopm leaves the flag set: no
/// deadlock is reported while stopping anyway.
pub(crate) fn ms_at_work(_sl: &SchedLocked, sched: &Sched) -> bool {
    sched.allm.lock().iter().any(|&mp| {
        // SAFETY: Ms live as long as the scheduler; only atomics are read,
        // handoffwork, under the lock we hold, and lockedg, which changes
        // only while its M holds a P (none does now).
        unsafe {
            (*mp).ninbox.load(Ordering::SeqCst) != 0
                || (*mp).insyscall.load(Ordering::SeqCst)
                || (*mp).handoffwork
                || (!(*mp).lockedg.is_null() && (*(*mp).lockedg).readgstatus() == status::RUNNABLE)
        }
    })
}

/// Binds `gp` to `mp` if it is bound to no M (only a migrating
/// scheduler has unbound started Gs): from now on it runs only on `mp`,
/// until `goexit0` (or, for a lock, `dounlockosthread`) unbinds it. For
/// a G that must stay on its thread for a while: one locked to it
/// (`dolockosthread`), one its runtime's teardown has claimed to resume
/// there (`teardown::nextvictim`).
///
/// # Safety
///
/// `gp` runs on `mp` and the caller is that G, or both are new and
/// nobody else's yet, or `gp` was just claimed by `mp`'s teardown.
pub(crate) unsafe fn bind_if_unbound(gp: *mut G, mp: *mut M) {
    // SAFETY: the contract: both are the caller's own.
    unsafe {
        if (*gp).boundm.is_null() {
            (*gp).boundm = mp;
            // On this M: a load and a store (see M::nbound_add).
            (*mp).nbound_add(1);
        }
    }
}

/// Whether locked G `gp` is runnable, read SeqCst after `mp` stored
/// `sleeping` (the M's half of the wake-up argument for locked Gs).
///
/// # Safety
///
/// `gp` is the locked G of the calling M.
pub(crate) unsafe fn locked_runnable(gp: *mut G) -> bool {
    fence(Ordering::SeqCst);
    // SAFETY: the contract.
    unsafe { (*gp).atomicstatus.load(Ordering::SeqCst) == status::RUNNABLE }
}

/// Starts a G running `f` locked to an M of its own (one with no other
/// bound G: an idle one, or a new one) and returns its goroutine id: what
/// `lock_os_thread` first thing in the goroutine would mean in Go, without
/// the neighbours a running M has (see the `proc` essay).
///
/// `sched` names the scheduler from a thread that is not one of its Ms.
///
/// # Panics
///
/// From a thread that is neither an M of a scheduler nor given `sched`.
#[track_caller]
pub(crate) fn newproc_locked<F: FnOnce() + Send + 'static>(
    sched: Option<&Sched>,
    f: F,
) -> Result<u64, crate::stack::StackError> {
    let cur = crate::proc::current_user_g();
    let here = if cur.is_null() {
        core::ptr::null()
    } else {
        // SAFETY: a user G of a scheduler M.
        unsafe { (*(*cur).m).rt }
    };
    // SAFETY: `here` is the scheduler of the M we run on, which outlives it.
    let sched = match (sched, unsafe { here.as_ref() }) {
        (Some(s), _) => s,
        (None, Some(h)) => h,
        (None, None) => panic!("gokernel: go or spawn called outside a gokernel runtime"),
    };
    let (id, untaken) = newproc_golocked(sched, f)?;
    let Some((gp, _spawning)) = untaken else {
        return Ok(id);
    };
    if !sched.platform.starts_threads() {
        // SAFETY: gp is new and nobody took it.
        unsafe { crate::cpu::discard_new_g(sched, gp) };
        panic!(
            "gokernel: go_locked: {}",
            crate::cpu::GoLockedError::NoFreeCpu
        );
    }
    // SAFETY: schedulers live in an Arc (Runtime::build); gp is new,
    // runnable and on no queue.
    unsafe { crate::proc::newm(sched, null_mut(), false, gp) };
    Ok(id)
}

/// [`newproc_golocked`]'s new G that no idle M took, with its count.
pub(crate) type Untaken<'a> = Option<(*mut G, crate::spawning::Spawning<'a>)>;

/// Makes a G running `f`, from a thread that holds no P, and hands it to
/// an idle M with no bound Gs, locked to it ([`golocked_idle`]). Returns
/// its id and, if no such M took it, the G (runnable, on no queue) with
/// the count (`crate::spawning`) that keeps `checkdead` off until the
/// caller has given it an M or discarded it: every P may be idle
/// meanwhile.
#[track_caller]
pub(crate) fn newproc_golocked<'a, F: FnOnce() + Send + 'static>(
    sched: &'a Sched,
    f: F,
) -> Result<(u64, Untaken<'a>), crate::stack::StackError> {
    let spawning = crate::spawning::Spawning::begin(sched);
    let gp = crate::proc::newproc1(sched, null_mut(), f, core::panic::Location::caller(), false)?;
    // SAFETY: gp is new and ours.
    let id = unsafe { (*gp).goid() };
    let mut sl = sched.lock.lock();
    // SAFETY: gp is new, runnable and on no queue.
    if unsafe { golocked_idle(&mut sl, sched, gp) } {
        spawning.end_locked(&mut sl);
        return Ok((id, None));
    }
    Ok((id, Some((gp, spawning))))
}

/// Hands new G `gp` to an idle M with no bound Gs (nobody waits for its
/// thread), locked to it, and wakes that M with a P (or puts it on
/// `mwantp`). False if every idle M has bound Gs. Under the lock.
///
/// # Safety
///
/// `gp` is a new runnable G of `sched` on no queue.
pub(crate) unsafe fn golocked_idle(sl: &mut SchedLocked, sched: &Sched, gp: *mut G) -> bool {
    let mut mp = sl.midle;
    // SAFETY: the idle list is under the lock; the contract for gp.
    unsafe {
        while !mp.is_null() && (*mp).nbound.load(Ordering::Relaxed) != 0 {
            mp = (*mp).schedlink;
        }
        if mp.is_null() {
            return false;
        }
        mremove(sl, mp);
        lockfresh(mp, gp);
        // It wakes in stopm with a P (or waits for one on mwantp)
        // and findrunnable hands it its locked G.
        givep(sl, sched, mp);
    }
    true
}

/// Locks new G `gp` to `mp`, which has no bound G and is not running, as
/// one `lock_os_thread` in `gp` would.
///
/// # Safety
///
/// `mp` is an M of a scheduler that is asleep or not started, with no
/// bound G; `gp` is a new runnable G of that scheduler on no queue.
pub(crate) unsafe fn lockfresh(mp: *mut M, gp: *mut G) {
    // SAFETY: the contract: both are ours until mp wakes (its note, or its
    // thread's start, orders these writes before its reads).
    unsafe {
        (*mp).lockedext = 1;
        crate::proc::dolockosthread(gp, mp);
    }
}
