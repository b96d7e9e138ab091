//! Waiting for an event: waiters, sudogs and wait queues (Go's `sudog`,
//! `waitq` and the parking half of `sema.go`).
//!
//! Channels, `select`, [`Mutex`](crate::sync::Mutex),
//! [`WaitGroup`](crate::sync::WaitGroup) and [`Once`](crate::sync::Once)
//! all block the same way:
//!
//! 1. Under the lock of the object (a [`SpinLock`]), the blocking side
//!    makes a [`Waiter`] and one [`Sudog`] per queue it waits on, and puts
//!    the sudogs on the object's [`WaitQ`]s.
//! 2. It calls `Waiter::block` with a function that releases the
//!    lock(s). A goroutine parks with `gopark`, and the lock is released on
//!    g0 *after* the goroutine's context is saved, so a waker that finds
//!    the sudog can never `goready` a goroutine that is still running. A
//!    plain thread releases the lock and then sleeps.
//! 3. A waker takes a sudog off a queue under the same lock and *claims*
//!    its waiter (`WaitQ::dequeue`): one compare-and-swap that only the
//!    first waker wins. For a `select`, one waiter stands behind a sudog on
//!    every channel of the select, and the claim is what makes exactly one
//!    case fire (Go's `selectDone`). Sudogs whose waiter was claimed
//!    through another queue are dropped from the queue on the way.
//! 4. The winner records the outcome (`Waiter::complete`) and moves the
//!    value through the sudog's `elem` pointer. Still under the lock it
//!    takes what the wake-up needs (`Waiter::wakeup`: for a goroutine, a
//!    strong reference to its scheduler, so that a runtime being dropped is
//!    never woken into), releases the lock and wakes the waiter
//!    (`Wakeup::wake`): `goready` for a goroutine, `Thread::unpark` for a
//!    thread. It touches neither the sudog nor the waiter after that: both
//!    live on the blocked side's stack, which may be gone as soon as it
//!    runs.
//!
//! A runtime dropped while its goroutines wait here frees their stacks, so
//! it first takes their sudogs off the queues they are on (`abandon`,
//! through `G::waiting`); the objects themselves stay usable by others.
//!
//! A waiter is woken exactly once, and only after it was claimed, so a
//! wake-up is never lost and never spurious.
//!
//! Plain threads can block here too (with `std`: `std::thread::park`;
//! without `std`, through the platform's
//! [`futexsleep`](crate::platform::Platform::futexsleep) on the waiter's
//! flag, woken by `futexwakeup` — the platform of the first scheduler
//! made; before any scheduler exists a thread has nothing to sleep
//! through and spins).

use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use crate::proc::{current_user_g, gopark, goready};
use crate::runtime2::{G, WaitReason};

/// A short lock for the runtime's own objects (Go's runtime `mutex`): it
/// guards a channel's buffer and queues, or a sync object's queue, for a
/// few dozen instructions at a time. Nobody blocks while holding it.
///
/// It spins; with `std`, a thread that spins long yields its CPU (the
/// holder may be a thread the OS preempted).
///
/// It also records who uses the object it guards (`note`):
/// one runtime, or several runtimes or plain threads ("shared"). A
/// goroutine that waits on a shared object counts as an external wait of
/// its runtime (`Sched::external_waits`), so that runtime's deadlock check
/// does not report it while another runtime or thread may still wake it.
pub struct SpinLock {
    locked: AtomicBool,
    /// [`REACH_NONE`], the address of the one scheduler whose goroutines
    /// have used the object, or [`REACH_SHARED`].
    reach: AtomicUsize,
}

/// No one has used the object yet.
const REACH_NONE: usize = 0;
/// Used by two runtimes, or by a plain thread (or an M without a
/// runtime). Schedulers are aligned, so no scheduler has this address.
const REACH_SHARED: usize = 1;

/// Who is calling, for [`SpinLock::note`]: the address of the current M's
/// scheduler, or [`REACH_SHARED`] on a plain thread or an M without one.
fn reach_key() -> usize {
    let gp = crate::tls::getg();
    if gp.is_null() {
        return REACH_SHARED;
    }
    // SAFETY: a non-null current G has a live M (mstart / execute set it).
    let rt = unsafe {
        let mp = (*gp).m;
        if mp.is_null() {
            core::ptr::null()
        } else {
            (*mp).rt
        }
    };
    if rt.is_null() {
        REACH_SHARED
    } else {
        rt as usize
    }
}

impl SpinLock {
    /// An unlocked lock.
    pub(crate) const fn new() -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            reach: AtomicUsize::new(REACH_NONE),
        }
    }

    /// Records a use of the guarded object by the caller's runtime (or
    /// thread). Called by [`lock`](Self::lock), when the object is made,
    /// and by fast paths that do not take the lock (`Mutex::lock`).
    #[inline]
    pub(crate) fn note(&self) {
        // Relaxed: the common case, nothing to record. A change is made
        // with SeqCst (below) and read under the lock by a waiter.
        let cur = self.reach.load(Ordering::Relaxed);
        if cur == REACH_SHARED {
            return;
        }
        let me = reach_key();
        if cur == me {
            return;
        }
        self.note_slow(cur, me);
    }

    #[cold]
    fn note_slow(&self, mut cur: usize, me: usize) {
        loop {
            let want = if cur == REACH_NONE { me } else { REACH_SHARED };
            // SeqCst: pairs with the load in `shared`; the object's
            // lock, held by both sides or taken after by the waiter,
            // orders it before a waiter's decision.
            match self
                .reach
                .compare_exchange(cur, want, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return,
                Err(now) if now == REACH_SHARED || now == me => return,
                Err(now) => cur = now,
            }
        }
    }

    /// True once the object has been used by more than one runtime, or by
    /// a plain thread. Read under the lock by a goroutine about to wait.
    pub(crate) fn shared(&self) -> bool {
        // SeqCst: pairs with the change in `note_slow`.
        self.reach.load(Ordering::SeqCst) == REACH_SHARED
    }

    /// Takes the lock.
    pub(crate) fn lock(&self) {
        self.note();
        let mut spins = 0u32;
        loop {
            // Acquire: what the previous holder wrote is visible to us.
            if !self.locked.swap(true, Ordering::Acquire) {
                return;
            }
            while self.locked.load(Ordering::Relaxed) {
                backoff(&mut spins);
            }
        }
    }

    /// Releases the lock.
    ///
    /// # Safety
    ///
    /// The caller holds the lock (possibly taken by the goroutine whose
    /// `gopark` unlock function this is).
    pub(crate) unsafe fn unlock(&self) {
        // Release: our writes under the lock happen before the next holder.
        self.locked.store(false, Ordering::Release);
    }
}

/// One blocking operation: who is blocked (a goroutine or a thread), and
/// how it ended. Lives on the blocked side's stack.
pub struct Waiter {
    /// Set by the one waker that wins the claim (Go's `selectDone`).
    claimed: AtomicBool,
    /// Which case completed (a `select`'s case index; 0 otherwise).
    fired: AtomicUsize,
    /// Whether the operation completed (a value moved, a lock handed
    /// over) rather than failed (the channel was closed).
    success: AtomicBool,
    /// Set by `complete`: the outcome is recorded (a claim alone is not
    /// an outcome: a waker that claims a goroutine of a stopping runtime
    /// drops it without completing). Read by the teardown, under the
    /// queue locks `abandon` takes.
    completed: AtomicBool,
    /// The goroutine, or null for a thread.
    g: *mut G,
    /// A thread's wake-up flag (0 asleep, 1 woken; without `std`, 2 while
    /// the waker is in `futexwakeup`).
    woken: AtomicU32,
    /// The thread to unpark.
    #[cfg(feature = "std")]
    thread: Option<std::thread::Thread>,
    /// Without `std`: what a thread sleeps through (see the module docs).
    #[cfg(not(feature = "std"))]
    platform: Option<&'static dyn crate::platform::Platform>,
    /// The sudogs queued for this waiter, linked by `waitlink` (so that a
    /// runtime dropped while its goroutine waits can take them off their
    /// queues: [`abandon`]).
    sudogs: core::cell::Cell<*mut Sudog>,
    /// It waits on an object another runtime or a thread uses
    /// ([`SpinLock::shared`]): a goroutine's wait then counts in its
    /// runtime's `external_waits`.
    external: core::cell::Cell<bool>,
}

impl Waiter {
    /// A waiter for the calling goroutine or thread.
    pub(crate) fn new() -> Self {
        let g = current_user_g();
        Waiter {
            claimed: AtomicBool::new(false),
            fired: AtomicUsize::new(0),
            success: AtomicBool::new(false),
            completed: AtomicBool::new(false),
            g,
            woken: AtomicU32::new(0),
            #[cfg(feature = "std")]
            thread: g.is_null().then(std::thread::current),
            #[cfg(not(feature = "std"))]
            platform: if g.is_null() {
                crate::cpu::thread_platform()
            } else {
                None
            },
            sudogs: core::cell::Cell::new(null_mut()),
            external: core::cell::Cell::new(false),
        }
    }

    /// Marks the wait as one that another runtime or a thread can end
    /// (see [`SpinLock::shared`]); call before [`block`](Self::block), if
    /// any object waited on is shared.
    pub(crate) fn set_external(&self) {
        self.external.set(true);
    }

    /// Claims the waiter: true for the first caller only.
    fn claim(&self) -> bool {
        // A waiter with one sudog (any wait but a `select` of several
        // cases) is only ever claimed under that sudog's queue lock, which
        // the caller holds: the lock orders the claims, so a load and a
        // store do (no locked instruction, as Go needs no `selectDone` CAS
        // outside `select`). The list of sudogs is complete and stable
        // here: it is built under the locks of every queue it names (a
        // select holds them all while it enqueues) before anyone can
        // dequeue one, and the waiter is blocked. With several sudogs on
        // several locks, the CAS decides.
        let sg = self.sudogs.get();
        // SAFETY: the sudogs of a blocked waiter live in its frame until
        // it is woken, which needs this claim.
        if !sg.is_null() && unsafe { (*sg).waitlink.is_null() } {
            if self.claimed.load(Ordering::Relaxed) {
                return false;
            }
            self.claimed.store(true, Ordering::Relaxed);
            return true;
        }
        // Relaxed is enough: claims are made under the lock of the queue
        // the sudog is on, and the outcome reaches the waiter through the
        // wake-up (which orders everything before it).
        self.claimed
            .compare_exchange(false, true, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Records the outcome, by the waker that claimed it.
    pub(crate) fn complete(&self, case: usize, success: bool) {
        // Relaxed: published by the wake-up that follows.
        self.fired.store(case, Ordering::Relaxed);
        self.success.store(success, Ordering::Relaxed);
        self.completed.store(true, Ordering::Relaxed);
    }

    /// Which case fired (after [`block`](Self::block) returned).
    pub(crate) fn fired(&self) -> usize {
        self.fired.load(Ordering::Relaxed)
    }

    /// Whether the operation succeeded (after [`block`](Self::block)).
    pub(crate) fn success(&self) -> bool {
        self.success.load(Ordering::Relaxed)
    }

    /// Blocks until a waker claims this waiter and wakes it. `unlock`
    /// releases the locks of the queues the waiter's sudogs are on: for a
    /// goroutine it runs on g0 once the goroutine is parked, for a thread
    /// before it sleeps. A goroutine's wait is recorded as `reason` (for
    /// dumps).
    pub(crate) fn block<F: FnOnce()>(&self, reason: WaitReason, unlock: F) {
        if self.g.is_null() {
            forbid_blocking_on_system_stack();
        }
        if !self.g.is_null() {
            // SAFETY: self.g is the running G; only its own M writes
            // `force`, while it is not running.
            if unsafe { (*self.g).force } != crate::teardown::FORCE_NONE {
                // Its runtime is being dropped: this park would unwind
                // (or, inside that unwinding, end the process) before
                // `unlock` runs. Unwinding with the locks held and the
                // sudogs queued would leave the objects locked for good,
                // their queues pointing into this unwound frame. So
                // first the sudogs come off (no waker can have claimed
                // one: we hold every lock of their queues), then the
                // locks are released.
                // SAFETY: self is our waiter, not yet blocked, and we
                // hold the lock of every queue its sudogs are on.
                unsafe { self.unqueue_locked() };
                unlock();
                // SAFETY: self.g is the running G; its force is set, so
                // this unwinds or ends the process.
                unsafe { crate::teardown::checkforce(self.g, false) };
                unreachable!("gokernel: a forced park returned");
            }
            // While it waits on an object others use, its runtime's
            // all-idle is not a deadlock (see `checkdead`). Counted before
            // it parks, so no check can see it idle and uncounted.
            // SAFETY: self.g is the running G, so its scheduler is live.
            let ext = self
                .external
                .get()
                .then(|| unsafe { ExternalCount::begin(&*(*self.g).rt) });
            // SAFETY: self.g is the running G; only it and (after every M
            // stopped) its scheduler's destructor read `waiting`.
            unsafe { (*self.g).waiting = self };
            let mut f = Some(unlock);
            // SAFETY: self.g is the running user G (checked in `new`, and a
            // waiter is used by the code that made it); run_unlock calls the
            // closure, which lives in this frame until we resume, and
            // returns true, so the G stays parked until `wake` readies it.
            unsafe { gopark(run_unlock::<F>, (&mut f as *mut Option<F>).cast(), reason) };
            // SAFETY: as above; we run again, so nobody else reads it.
            unsafe { (*self.g).waiting = core::ptr::null() };
            drop(ext);
            return;
        }
        unlock();
        // Acquire: pairs with the release in `wake`, so the outcome and
        // any value moved to us are visible.
        while self.woken.load(Ordering::Acquire) == 0 {
            #[cfg(feature = "std")]
            std::thread::park();
            #[cfg(not(feature = "std"))]
            match self.platform {
                // Returns at once if the waker changed the flag meanwhile.
                // While it is WAKING the waker is in its futexwakeup: the
                // store of 1 follows at once.
                Some(p) if self.woken.load(Ordering::Relaxed) == 0 => {
                    p.futexsleep(&self.woken, 0, None)
                }
                _ => core::hint::spin_loop(),
            }
        }
    }

    /// Takes this waiter's sudogs off their queues, before it blocks.
    ///
    /// # Safety
    ///
    /// By the waiter's owner, holding the lock of every queue its sudogs
    /// are on.
    unsafe fn unqueue_locked(&self) {
        let mut sg = self.sudogs.get();
        while !sg.is_null() {
            // SAFETY: the contract: the sudogs are live in the owner's
            // frame, and their queues are locked by us.
            unsafe {
                (*(*sg).q).remove(sg);
                sg = (*sg).waitlink;
            }
        }
    }

    /// Gets ready to wake a claimed waiter, under the lock of the queue
    /// it was taken from; [`Wakeup::wake`] it after releasing the lock.
    /// `None` for a goroutine whose runtime is stopping or being dropped:
    /// it will not run again.
    ///
    /// For a goroutine this holds its scheduler, which so cannot go away
    /// before the wake-up is done.
    ///
    /// # Safety
    ///
    /// `w` was claimed by the caller (through [`WaitQ::dequeue`]) and is
    /// blocked in [`block`](Self::block), and the caller holds the lock of
    /// the queue it was on. `w` must not be used after the lock is
    /// released.
    unsafe fn wakeup(w: *const Waiter) -> Option<Wakeup> {
        // SAFETY: the contract: w is blocked, so alive; its G is alive
        // while its sudog is queued (a dropped runtime unlinks the sudogs
        // of its goroutines under this lock before freeing them), and so
        // is the G's scheduler, whose `self_weak` tells whether it is
        // still usable.
        unsafe {
            let g = (*w).g;
            if !g.is_null() {
                let me = current_user_g();
                // On a goroutine of g's own scheduler, that scheduler is
                // alive while we run (it outlives the Ms that run its
                // Gs): no `Weak::upgrade` and drop (two locked
                // instructions per wake-up).
                let rt = if !me.is_null() && (*(*me).m).rt == (*g).rt {
                    None
                } else {
                    Some((*(*g).rt).self_weak.upgrade()?)
                };
                if (*(*g).rt).stopping.load(Ordering::SeqCst) {
                    return None;
                }
                return Some(Wakeup(WakeupKind::G(g, rt)));
            }
            #[cfg(feature = "std")]
            if let Some(t) = (*w).thread.clone() {
                return Some(Wakeup(WakeupKind::Thread(&(*w).woken, t)));
            }
            #[cfg(not(feature = "std"))]
            if let Some(p) = (*w).platform {
                return Some(Wakeup(WakeupKind::Futex(&(*w).woken, p)));
            }
            Some(Wakeup(WakeupKind::Spinner(&(*w).woken)))
        }
    }
}

/// Refuses to wait on an M's own stack (g0, or the signal stack): an
/// `after_func` callback, a `systemstack` closure. Waiting there would put
/// the M's thread to sleep (it is not a goroutine that can park), with the
/// P it holds and every goroutine bound to that thread: the runtime would
/// hang silently. It is a fatal error instead, naming the goroutine whose
/// `systemstack` closure it is, or the M. A plain thread (no M) may wait.
pub(crate) fn forbid_blocking_on_system_stack() {
    let gp = crate::tls::getg();
    // SAFETY: a non-null current G has a live M (mstart / execute set it).
    let on_system_stack = !gp.is_null()
        && unsafe {
            let mp = (*gp).m;
            !mp.is_null() && (core::ptr::eq((*mp).g0, gp) || core::ptr::eq((*mp).gsignal, gp))
        };
    if !on_system_stack {
        return;
    }
    crate::panic::throw_on_system_stack(
        "blocking on the system stack: a channel, sync or join wait in an after_func callback \
         or a systemstack closure would put the M to sleep (they must not block)",
    );
}

/// One count in a scheduler's `external_waits`, for as long as it lives.
struct ExternalCount<'a>(&'a crate::runtime2::Sched);

impl<'a> ExternalCount<'a> {
    fn begin(s: &'a crate::runtime2::Sched) -> Self {
        // SeqCst: checkdead reads it with SeqCst under the scheduler lock.
        s.external_waits.fetch_add(1, Ordering::SeqCst);
        ExternalCount(s)
    }
}

impl Drop for ExternalCount<'_> {
    fn drop(&mut self) {
        // SeqCst: as in `begin`.
        self.0.external_waits.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A wake-up taken under a queue's lock by `Waiter::wakeup`, done after
/// the lock is released. Opaque outside the crate.
pub struct Wakeup(WakeupKind);

enum WakeupKind {
    /// A parked goroutine and its scheduler, held (`None` when the waker
    /// is a goroutine of that scheduler, which keeps it alive).
    G(*mut G, Option<alloc::sync::Arc<crate::runtime2::Sched>>),
    /// A thread blocked on its flag.
    #[cfg(feature = "std")]
    Thread(*const AtomicU32, std::thread::Thread),
    /// A thread that sleeps on its flag through the platform (no `std`).
    #[cfg(not(feature = "std"))]
    Futex(*const AtomicU32, &'static dyn crate::platform::Platform),
    /// A thread that spins on its flag.
    #[cfg_attr(feature = "std", allow(dead_code))]
    Spinner(*const AtomicU32),
}

impl Wakeup {
    /// Wakes the waiter. The waiter may return (and its memory go away)
    /// as soon as this starts, so nothing of it is touched after the
    /// one store or `goready` that wakes it.
    pub(crate) fn wake(self) {
        match self.0 {
            WakeupKind::G(g, rt) => {
                // SAFETY: g parked in `Waiter::block` and its unlock
                // function ran (its sudog was found after the lock was
                // released), the claim made us its one waker, and `rt`
                // (or, without it, the waker's own goroutine of the same
                // scheduler) keeps its scheduler (and so g) alive.
                unsafe {
                    match &rt {
                        None => goready(g),
                        Some(s) => ready_outside::<true>(s, g),
                    }
                };
                drop(rt);
            }
            #[cfg(feature = "std")]
            WakeupKind::Thread(flag, t) => {
                // SAFETY: the thread is blocked until this store, so the
                // flag is alive for it. Release: pairs with the acquire
                // in `block`, publishing the outcome and the value.
                unsafe { (*flag).store(1, Ordering::Release) };
                t.unpark();
            }
            #[cfg(not(feature = "std"))]
            WakeupKind::Futex(flag, p) => {
                // SAFETY: as above: the thread stays blocked, and the flag
                // alive, until the store of 1, which is the last thing
                // done. The flag is WAKING (2) meanwhile, so the thread's
                // futexsleep returns and it spins for the short rest.
                unsafe {
                    (*flag).store(WAKING, Ordering::Relaxed);
                    p.futexwakeup(&*flag, 1);
                    (*flag).store(1, Ordering::Release);
                }
            }
            // SAFETY: as above.
            WakeupKind::Spinner(flag) => unsafe { (*flag).store(1, Ordering::Release) },
        }
    }
}

/// One step of a short wait for another thread to finish something: a
/// CPU pause for the first 100 steps (`spins` counts them), then, hosted,
/// the thread's CPU given away, since the thread waited for may have lost
/// its own. Out of line: only a wait that found the other thread busy
/// takes it.
#[cold]
#[inline(never)]
pub(crate) fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    #[cfg(feature = "std")]
    if *spins >= 100 {
        std::thread::yield_now();
        return;
    }
    core::hint::spin_loop();
}

/// Readies `gp`, a parked goroutine of `sched`, from a thread that is not
/// one of `sched`'s running Ms (a plain thread, a goroutine of another
/// runtime, g0 running a timer callback) (Go's `goready`); where it goes
/// as [`crate::proc::ready`] chooses: `runnext` if `NEXT` (as `goready`),
/// else the tail (the poller's wakers).
///
/// Counted in the teardown barrier's `outside`, which a scheduler being
/// dropped waits to see at zero before it resumes any goroutine. Else a
/// wake-up that passed `ready`'s `stopping` check just before the drop
/// began could store RUNNABLE and queue `gp` after the teardown had
/// resumed it (a waker completed its wait) and it had moved on or
/// exited: seen as runnable again, a dead goroutine was resumed
/// ("goexit: resumed a dead goroutine", with `migrate_started_goroutines`).
///
/// # Safety
///
/// As [`goready`]; `sched` is `gp`'s scheduler, held alive by the caller.
pub(crate) unsafe fn ready_outside<const NEXT: bool>(sched: &crate::runtime2::Sched, gp: *mut G) {
    let outside = &sched.teardown.outside;
    // SeqCst: before `ready`'s SeqCst load of `stopping`, pairing with
    // the shutdown's store of `stopping` before the barrier's load of the
    // count: the barrier sees this wake-up counted (and waits for it), or
    // `ready` sees `stopping` (and does nothing).
    outside.fetch_add(1, Ordering::SeqCst);
    #[cfg(all(test, feature = "std"))]
    tests::in_outside_wakeup(sched);
    // SAFETY: the contract.
    unsafe { crate::proc::ready::<NEXT>(gp) };
    // SeqCst: the barrier's load that sees it acquires what `ready` did.
    outside.fetch_sub(1, Ordering::SeqCst);
}

/// A thread's `Waiter::woken` while its waker is in `futexwakeup` (no
/// `std`): not woken yet, but no longer to sleep.
#[cfg(not(feature = "std"))]
const WAKING: u32 = 2;

/// `gopark`'s unlock function for [`Waiter::block`].
///
/// # Safety
///
/// `arg` points at a live `Option<F>`.
unsafe fn run_unlock<F: FnOnce()>(_gp: *mut G, arg: *mut ()) -> bool {
    // SAFETY: the contract; the closure is taken once.
    if let Some(f) = unsafe { (*arg.cast::<Option<F>>()).take() } {
        f();
    }
    true
}

/// A waiter's place on one wait queue (Go's `sudog`). Lives on the blocked
/// side's stack; it must not move while queued.
pub struct Sudog {
    /// The blocked operation (shared by all sudogs of one `select`).
    pub(crate) waiter: *const Waiter,
    /// The value's slot, an `Option<T>` of the queue's element type: a
    /// sender's value to take, or a receiver's slot to fill.
    pub(crate) elem: *mut (),
    /// The `select` case this sudog stands for.
    pub(crate) case: usize,
    next: *mut Sudog,
    prev: *mut Sudog,
    /// On a queue now.
    queued: bool,
    /// The queue it was put on, and that queue's lock.
    q: *mut WaitQ,
    qlock: *const SpinLock,
    /// The waiter's next sudog (`Waiter::sudogs`).
    waitlink: *mut Sudog,
}

impl Sudog {
    /// A sudog for `waiter`, not queued.
    pub(crate) fn new(waiter: &Waiter, elem: *mut (), case: usize) -> Self {
        Sudog {
            waiter,
            elem,
            case,
            next: null_mut(),
            prev: null_mut(),
            queued: false,
            q: null_mut(),
            qlock: core::ptr::null(),
            waitlink: null_mut(),
        }
    }
}

/// A FIFO of sudogs, linked through them (Go's `waitq`). Guarded by the
/// lock of the object it belongs to.
pub struct WaitQ {
    first: *mut Sudog,
    last: *mut Sudog,
}

impl WaitQ {
    /// An empty queue.
    pub(crate) const fn new() -> Self {
        WaitQ {
            first: null_mut(),
            last: null_mut(),
        }
    }

    /// True if no sudog is queued (some may be stale `select` ones).
    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_null()
    }

    /// Records that `sg` is going on this queue, guarded by `lock`.
    ///
    /// # Safety
    ///
    /// By the owner of `sg`'s waiter, under `lock`.
    unsafe fn attach(&mut self, sg: *mut Sudog, lock: &SpinLock) {
        // SAFETY: the contract: the waiter is ours and not yet blocked.
        unsafe {
            (*sg).q = self;
            (*sg).qlock = lock;
            let w = &*(*sg).waiter;
            (*sg).waitlink = w.sudogs.get();
            w.sudogs.set(sg);
        }
    }

    /// Appends `sg`.
    ///
    /// # Safety
    ///
    /// Under the queue's lock, `lock`, by the owner of `sg`'s waiter; `sg`
    /// is live, not queued, and stays put until it is dequeued or removed.
    pub(crate) unsafe fn enqueue(&mut self, sg: *mut Sudog, lock: &SpinLock) {
        // SAFETY: the contract; queued sudogs are live.
        unsafe {
            self.attach(sg, lock);
            (*sg).next = null_mut();
            (*sg).prev = self.last;
            (*sg).queued = true;
            if self.last.is_null() {
                self.first = sg;
            } else {
                (*self.last).next = sg;
            }
        }
        self.last = sg;
    }

    /// Puts `sg` first (a waiter that lost a race keeps its place).
    ///
    /// # Safety
    ///
    /// As [`enqueue`](Self::enqueue).
    pub(crate) unsafe fn push_front(&mut self, sg: *mut Sudog, lock: &SpinLock) {
        // SAFETY: the contract; queued sudogs are live.
        unsafe {
            self.attach(sg, lock);
            (*sg).prev = null_mut();
            (*sg).next = self.first;
            (*sg).queued = true;
            if self.first.is_null() {
                self.last = sg;
            } else {
                (*self.first).prev = sg;
            }
        }
        self.first = sg;
    }

    /// Takes the first sudog whose waiter this call claims, with what it
    /// takes to wake it; `None` if none is left.
    ///
    /// Skipped and dropped from the queue on the way: sudogs whose waiter
    /// was claimed elsewhere (a `select` that fired on another channel),
    /// and goroutines of a runtime that is stopping or gone (they will
    /// never run again; a value handed to them would be lost).
    ///
    /// # Safety
    ///
    /// Under the queue's lock.
    pub(crate) unsafe fn dequeue(&mut self) -> Option<(*mut Sudog, Wakeup)> {
        loop {
            let sg = self.first;
            if sg.is_null() {
                return None;
            }
            // SAFETY: queued sudogs and their waiters are live: their owner
            // is blocked until claimed, and takes the lock to leave.
            unsafe {
                self.remove(sg);
                let w = (*sg).waiter;
                if (*w).claim()
                    && let Some(wakeup) = Waiter::wakeup(w)
                {
                    return Some((sg, wakeup));
                }
            }
        }
    }

    /// Takes every sudog whose waiter this call claims, records the same
    /// outcome for each, and returns their wake-ups (Go's "ready them
    /// all" loops in `closechan` and `semrelease`).
    ///
    /// # Safety
    ///
    /// Under the queue's lock.
    pub(crate) unsafe fn dequeue_all(&mut self, success: bool) -> alloc::vec::Vec<Wakeup> {
        let mut wake = alloc::vec::Vec::new();
        // SAFETY: the contract; each sudog is ours once dequeued.
        while let Some((sg, wakeup)) = unsafe { self.dequeue() } {
            // SAFETY: as above: claimed, so ours until woken.
            unsafe { (*(*sg).waiter).complete((*sg).case, success) };
            wake.push(wakeup);
        }
        wake
    }

    /// Blocks the caller on queue `q`: a sudog for it (with `elem` as its
    /// value slot) goes at the back, or the front with `front`, and `lock`
    /// is released once it is safe. Returns whether the waker reported
    /// success. (A raw `q`: wakers change the queue while we wait, so no
    /// reference to it may be held across the wait.)
    ///
    /// # Safety
    ///
    /// The caller holds `lock`, which guards `q`, and `elem` is what the
    /// queue's wakers expect (or null if they ignore it). The queue must
    /// stay alive while the caller waits.
    pub(crate) unsafe fn wait(
        q: *mut WaitQ,
        lock: &SpinLock,
        elem: *mut (),
        front: bool,
        reason: WaitReason,
    ) -> bool {
        let waiter = Waiter::new();
        if lock.shared() {
            waiter.set_external();
        }
        let mut sg = Sudog::new(&waiter, elem, 0);
        // SAFETY: the contract; sg stays in this frame until a waker takes
        // it off the queue, which it must do before waking us. The
        // reference to the queue ends with this block.
        unsafe {
            if front {
                (*q).push_front(&mut sg, lock);
            } else {
                (*q).enqueue(&mut sg, lock);
            }
        }
        // SAFETY: we hold the lock; it is released once we are parked.
        waiter.block(reason, || unsafe { lock.unlock() });
        waiter.success()
    }

    /// Takes `sg` off the queue if it is still on it.
    ///
    /// # Safety
    ///
    /// Under the queue's lock; `sg` is live and, if queued, on this queue.
    pub(crate) unsafe fn remove(&mut self, sg: *mut Sudog) {
        // SAFETY: the contract; neighbours on the queue are live.
        unsafe {
            if !(*sg).queued {
                return;
            }
            let (prev, next) = ((*sg).prev, (*sg).next);
            if prev.is_null() {
                self.first = next;
            } else {
                (*prev).next = next;
            }
            if next.is_null() {
                self.last = prev;
            } else {
                (*next).prev = prev;
            }
            (*sg).next = null_mut();
            (*sg).prev = null_mut();
            (*sg).queued = false;
        }
    }
}

/// Takes the sudogs of a goroutine's waiter off their queues, for good:
/// its runtime is being dropped and its stack (where they live) freed.
/// Whatever the goroutine waited on stays usable by others.
///
/// # Safety
///
/// `w` is the waiter of a goroutine parked in [`Waiter::block`] whose
/// scheduler has no running M and is being dropped.
pub(crate) unsafe fn abandon(w: *const Waiter) {
    // SAFETY: the contract: the G is parked forever, so its waiter and
    // sudogs are intact; the objects they are queued on are alive, since
    // the G's own frames (never unwound) hold references to them.
    unsafe {
        let mut sg = (*w).sudogs.get();
        while !sg.is_null() {
            let lock = &*(*sg).qlock;
            lock.lock();
            (*(*sg).q).remove(sg);
            lock.unlock();
            sg = (*sg).waitlink;
        }
    }
}

/// Whether a waker recorded an outcome for `w` (a value moved to or from
/// it, a lock handed to it, a close): if so, the goroutine must resume
/// normally to take it up, not unwind from its park.
///
/// # Safety
///
/// As for [`abandon`], which must have run first (its locks order the
/// waker's writes before this read).
pub(crate) unsafe fn completed(w: *const Waiter) -> bool {
    // SAFETY: the contract.
    unsafe { (*w).completed.load(Ordering::Relaxed) }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use core::cell::Cell;
    use core::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use crate::runtime2::Sched;

    std::thread_local! {
        /// Set on the thread whose next outside wake-up should pause.
        static PAUSE: Cell<bool> = const { Cell::new(false) };
    }

    /// What the paused wake-up saw: the teardown let its Ms go.
    static SAW_GO: AtomicBool = AtomicBool::new(false);
    /// The wake-up paused.
    static PAUSED: AtomicBool = AtomicBool::new(false);
    /// One paused wake-up at a time (the tests share the two flags above).
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Called by `ready_outside` once counted: on a thread with `PAUSE`,
    /// waits until every M of the scheduler has reached the teardown
    /// barrier, then records whether the barrier let them go.
    pub(super) fn in_outside_wakeup(sched: &Sched) {
        if !PAUSE.with(|p| p.replace(false)) {
            return;
        }
        let tp = &sched.teardown;
        while tp.arrived.load(Ordering::SeqCst) < sched.nmlive.load(Ordering::SeqCst)
            || tp.arrived.load(Ordering::SeqCst) == 0
        {
            std::thread::yield_now();
        }
        SAW_GO.store(tp.go.load(Ordering::SeqCst), Ordering::SeqCst);
        PAUSED.store(true, Ordering::SeqCst);
    }

    /// Runs `wake` on a plain thread whose wake-up from outside pauses
    /// until every M of `rt` has reached the teardown barrier, drops `rt`
    /// meanwhile, and checks that the wake-up was counted as from outside
    /// (`what`: whose) and that the barrier waited for it.
    fn drop_during_a_paused_wake_up(
        rt: crate::Runtime,
        what: &str,
        wake: impl FnOnce() + Send + 'static,
    ) {
        let started = Arc::new(AtomicBool::new(false));
        let s2 = started.clone();
        let t = std::thread::spawn(move || {
            PAUSE.with(|p| p.set(true));
            s2.store(true, Ordering::SeqCst);
            wake();
        });
        while !started.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        drop(rt);
        t.join().unwrap();
        assert!(
            PAUSED.load(Ordering::SeqCst),
            "{what} wake-up was not counted as from outside"
        );
        assert!(
            !SAW_GO.load(Ordering::SeqCst),
            "the teardown went on while {what} wake-up from outside was half done"
        );
    }

    #[test]
    fn a_dropped_runtime_resumes_no_goroutine_while_a_wake_up_from_outside_is_under_way() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        PAUSED.store(false, Ordering::SeqCst);
        let rt = crate::Runtime::builder().procs(1).build().unwrap();
        let c = crate::chan::<u32>(0);
        let c2 = c.clone();
        let h = rt.spawn(move || c2.recv());
        while rt.stats().goroutines.waiting < 1 {
            std::thread::yield_now();
        }
        // The sender completes the receive.
        drop_during_a_paused_wake_up(rt, "a send's", move || c.send(5).unwrap());
        // Its receive was completed: the goroutine resumed to take it.
        assert_eq!(h.join().ok(), Some(Ok(5)));
    }
    /// The same for the poller's waker: a `close` on a plain thread that
    /// wakes a goroutine reading the socket (`netpollwake`).
    #[test]
    fn a_dropped_runtime_resumes_no_goroutine_while_a_close_from_outside_wakes_it() {
        use std::io::Read;
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        PAUSED.store(false, Ordering::SeqCst);
        let rt = crate::Runtime::builder().procs(1).build().unwrap();
        let l = crate::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = crate::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let other = s.try_clone().unwrap();
        let h = rt.spawn(move || (&s).read(&mut [0; 1]).map(drop));
        while rt.stats().goroutines.waiting < 1 {
            std::thread::yield_now();
        }
        // The close wakes the reader.
        drop_during_a_paused_wake_up(rt, "a close's", move || other.close());
        drop(c);
        // The close's wake-up came too late (the runtime was stopping):
        // the teardown unwound the reader instead, once that wake-up was
        // done.
        let e = h
            .join()
            .expect_err("the reader returned from a stopped runtime");
        assert!(
            e.downcast_ref::<crate::RuntimeDropped>().is_some(),
            "the reader ended otherwise than by the teardown's unwinding"
        );
    }
}
