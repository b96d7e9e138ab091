//! Wake-ups from interrupt handlers (Go's netpoll injection:
//! `netpoll` hands `findRunnable` a list of goroutines, `injectglist`
//! makes them runnable, and an idle M is started to run them).
//!
//! An interrupt handler may run in the middle of anything: a goroutine,
//! the scheduler holding [`Sched`]'s lock, an M in the middle of
//! `runqput` on its own P, the allocator. So the calls here take no lock,
//! touch no queue that only an owner may touch, and allocate nothing:
//!
//! - [`IrqEvent::signal`] readies the goroutine waiting in
//!   [`IrqEvent::wait`] (or, if none waits yet, is remembered: the next
//!   `wait` returns at once);
//! - [`IrqWork::post`] asks for a function to run on an M of a scheduler
//!   soon.
//!
//! Both post a `'static` node (the event or the work item itself) to the
//! scheduler's *injection list*, a lock-free stack (one compare-and-swap
//! to push; the scheduler takes the whole list with one swap, so there is
//! no ABA), and then kick an idle M. The Ms drain the list where Go calls
//! `netpoll`: at the top of `findrunnable`, on an M holding a P, in
//! ordinary (not interrupt) context. Draining is where the goroutine is
//! made runnable, by the usual `ready`: a goroutine bound to its M (the
//! default) goes to that M's own queue or inbox from there, never from the
//! handler, so the inbox's spin lock is never taken by an interrupt.
//!
//! # No lost wake-up
//!
//! The poster pushes its node (SeqCst) and then reads `npidle`,
//! `nmspinning` and each M's `sleeping` (SeqCst): Go's `injectglist`
//! rule, "start an M if a P is idle and no M spins", with a kick of an
//! idle M instead of `startm` (which takes the scheduler lock and may
//! start a thread). Every M that could be the one to run the work has a
//! matching store-then-load:
//!
//! - An M that holds a P drains the list at its next scheduling point
//!   (the top of `findrunnable`), whatever the poster read.
//! - A spinning M decrements `nmspinning` and then, in its last checks
//!   before it sleeps, reads the list; the poster reads `nmspinning` after
//!   its push. One sees the other: the poster sees a spinning M, which
//!   will see the node, or sees none and kicks.
//! - An M going to sleep without a P stores its `sleeping` (`IDLE` in
//!   `stopm`, `TIMER` in `timersleep`) and then reads the list (in
//!   `stopm`, under the scheduler lock; in `timersleep`, after reading the
//!   futex word it sleeps on). The poster reads `sleeping` after its push:
//!   either the M sees the node and takes an idle P (as a spinning M)
//!   instead of sleeping, or the poster sees it asleep and kicks it: an
//!   `IDLE` M through its note (`notekick`: the note's word changes, so a
//!   kick before the M's `futexsleep` makes it return at once), a `TIMER`
//!   M through the timer sleeper's word (`netpollbreak`). A kicked M looks
//!   at the list (and at `cpu`'s `wantm`) and takes an idle P if there is
//!   work, or sleeps again.
//! - An M that puts a P on the idle list reads the list after its SeqCst
//!   increment of `npidle` (the spinning M's checks, `handoffp`'s scan);
//!   the poster reads `npidle` after its push. If the poster saw no idle
//!   P, it kicks nobody, and the M idling a P sees the node.
//!
//! A kick can reach an M that is just leaving its sleep for another
//! reason (the poster read `IDLE` a moment before): that M holds or gets
//! a P and drains the list at its next scheduling point, so the work is
//! not lost, only later than an idle M would have run it.
//!
//! # Where the work runs
//!
//! An [`IrqWork`] function runs on g0 of an M holding a P, like a timer's
//! [`after_func`](crate::time::after_func): it must not block (a channel
//! receive, a `Mutex`, `sleep` are fatal there), and should be short; it
//! may start goroutines, `unpark` them, and send on channels with room.
//!
//! The scheduler must be `'static` ([`Sched::leak`] or a kernel's static
//! scheduler): a handler may run at any time, even while the scheduler
//! shuts down, and must never reach freed memory. After
//! [`Sched::shutdown`] nothing drains the list any more: a posted node
//! stays posted.
//!
//! See `docs/interrupts.md` for the calls allowed in an interrupt
//! handler.

use core::ptr::null_mut;
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use crate::runtime2::{G, Sched};

/// A node of an injection list: the first field of an [`IrqEvent`] or an
/// [`IrqWork`] (both `#[repr(C)]`), which it runs when drained.
#[repr(C)]
struct Node {
    /// The next node on the list (written by the poster before its push).
    next: AtomicPtr<Node>,
    /// What draining the node does, on an M holding a P of `sched`.
    run: unsafe fn(*const Node, &Sched),
}

/// A scheduler's injection list (Go's list that `netpoll` returns).
pub(crate) struct Inject {
    /// Head of a lock-free stack of posted nodes, newest first.
    head: AtomicPtr<Node>,
}

impl Inject {
    pub(crate) const fn new() -> Self {
        Inject {
            head: AtomicPtr::new(null_mut()),
        }
    }
}

/// Pushes `n` on `sched`'s injection list and kicks an M to drain it.
/// Lock-free and allocation-free.
fn post(sched: &Sched, n: &'static Node) {
    let node = n as *const Node as *mut Node;
    let mut head = sched.inject.head.load(Ordering::Relaxed);
    loop {
        n.next.store(head, Ordering::Relaxed);
        // SeqCst: the poster's store in the no-lost-wake-up argument;
        // release publishes what the node carries (the waiting G).
        match sched.inject.head.compare_exchange_weak(
            head,
            node,
            Ordering::SeqCst,
            Ordering::Relaxed,
        ) {
            Ok(_) => break,
            Err(h) => head = h,
        }
    }
    crate::cpu::kick(sched);
}

/// Whether nodes wait on `sched`'s injection list. `SeqCst`: the M's load
/// in the no-lost-wake-up argument.
#[inline]
pub(crate) fn pending(sched: &Sched) -> bool {
    !sched.inject.head.load(Ordering::SeqCst).is_null()
}

/// Runs what the nodes on `sched`'s injection list ask for, oldest first
/// (Go's `injectglist` of the list `netpoll` returned): readies waiting
/// goroutines, calls posted functions.
///
/// On g0 of an M of `sched` holding a P, in ordinary context.
#[cold]
pub(crate) fn injectglist(sched: &Sched) {
    // Acquire: pairs with the posters' SeqCst push.
    let mut n = sched.inject.head.swap(null_mut(), Ordering::Acquire);
    // Newest first on the stack: reverse, so the oldest runs first.
    let mut fifo: *mut Node = null_mut();
    while !n.is_null() {
        // SAFETY: nodes on the list are 'static (post takes &'static) and
        // ours alone once taken off it.
        let next = unsafe { (*n).next.load(Ordering::Relaxed) };
        // SAFETY: as above.
        unsafe { (*n).next.store(fifo, Ordering::Relaxed) };
        fifo = n;
        n = next;
    }
    while !fifo.is_null() {
        // SAFETY: as above. `next` is read before `run`, which may let the
        // node be posted again.
        unsafe {
            let next = (*fifo).next.load(Ordering::Relaxed);
            ((*fifo).run)(fifo, sched);
            fifo = next;
        }
    }
}

// ---------------------------------------------------------------------
// IrqEvent

/// [`IrqEvent`]: nothing happened, nobody waits.
const EV_EMPTY: u32 = 0;
/// [`IrqEvent`]: signalled with nobody waiting; the next wait returns.
const EV_SIGNALLED: u32 = 1;
/// [`IrqEvent`]: a goroutine waits (`g`, `sched` are set).
const EV_WAITING: u32 = 2;
/// [`IrqEvent`]: signalled while a goroutine waits; on the injection list.
const EV_POSTED: u32 = 3;

/// An event an interrupt handler signals and one goroutine waits for: a
/// binary semaphore whose `signal` is interrupt-safe.
///
/// A signal with nobody waiting is kept (one, however many arrive): the
/// next [`wait`](Self::wait) returns at once. Signals while the goroutine
/// is being woken are merged into that wake-up. So a driver loops:
/// wait, then handle everything the device has (more may have arrived
/// than one wake-up says).
///
/// # Example
///
/// ```
/// use gokernel::intr::IrqEvent;
/// use gokernel::platform::hosted::HOSTED;
/// use gokernel::runtime2::Sched;
///
/// static EV: IrqEvent = IrqEvent::new();
/// let sched = Sched::leak(Sched::new(1, gokernel::stack::STACK_MIN, &HOSTED));
/// let done = gokernel::chan::<()>(1);
/// let d = done.clone();
/// sched.go(Box::new(move || {
///     EV.wait(sched); // parks until the "interrupt"
///     d.send(()).unwrap();
/// })).unwrap();
/// EV.signal(); // what a handler would call
/// done.recv().unwrap(); // a plain thread may wait on a channel
/// sched.shutdown();
/// ```
#[repr(C)]
pub struct IrqEvent {
    node: Node,
    /// `EV_EMPTY`, `EV_SIGNALLED`, `EV_WAITING` or `EV_POSTED`.
    state: AtomicU32,
    /// The waiting G (while `EV_WAITING` / `EV_POSTED`).
    g: AtomicPtr<G>,
    /// Its scheduler (while `EV_WAITING` / `EV_POSTED`).
    sched: AtomicPtr<Sched>,
}

impl Default for IrqEvent {
    fn default() -> Self {
        Self::new()
    }
}

impl IrqEvent {
    /// An event not signalled, with nobody waiting.
    pub const fn new() -> Self {
        IrqEvent {
            node: Node {
                next: AtomicPtr::new(null_mut()),
                run: ev_run,
            },
            state: AtomicU32::new(EV_EMPTY),
            g: AtomicPtr::new(null_mut()),
            sched: AtomicPtr::new(null_mut()),
        }
    }

    /// Parks the calling goroutine until the event is signalled, and
    /// consumes the signal; returns at once if it was signalled already.
    /// `sched` is the caller's scheduler, `'static` so that a handler can
    /// reach it at any time.
    ///
    /// # Panics
    ///
    /// Outside a goroutine of `sched`, and if another goroutine is
    /// waiting on the event already (one waiter at a time).
    #[track_caller]
    pub fn wait(&'static self, sched: &'static Sched) {
        let gp = crate::proc::require_user_g("intr::IrqEvent::wait");
        // SAFETY: a user G of a scheduler has a live M with that scheduler.
        let rt = unsafe { (*(*gp).m).rt };
        assert!(
            core::ptr::eq(rt, sched),
            "gokernel::intr::IrqEvent::wait: the scheduler given is not the calling goroutine's"
        );
        loop {
            // Acquire: what the handler's side wrote before signalling.
            match self.state.compare_exchange(
                EV_SIGNALLED,
                EV_EMPTY,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(EV_EMPTY) => {}
                Err(_) => panic!(
                    "gokernel::intr::IrqEvent::wait: another goroutine is waiting on this event"
                ),
            }
            self.g.store(gp, Ordering::Relaxed);
            self.sched
                .store(sched as *const Sched as *mut Sched, Ordering::Relaxed);
            let mut parked = false;
            let mut arg = (self, &mut parked);
            // SAFETY: on a user G of a scheduler M; ev_commit only uses
            // `arg`, which lives in this frame until we resume.
            unsafe {
                crate::proc::gopark(ev_commit, (&mut arg as *mut (&IrqEvent, &mut bool)).cast())
            };
            if parked {
                // Readied by the drain of our post: that was the signal.
                return;
            }
            // A signal came between the check and the park: consume it.
        }
    }

    /// Signals the event: readies the goroutine waiting on it, or, if
    /// none waits, makes the next [`wait`](Self::wait) return at once.
    ///
    /// Interrupt-safe: no lock, no allocation, no owner-only queue; an
    /// interrupt handler may call it whatever code it interrupted
    /// (see the [module docs](self)). Also fine from any thread.
    pub fn signal(&'static self) {
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            let (to, wake) = match s {
                EV_EMPTY => (EV_SIGNALLED, false),
                EV_WAITING => (EV_POSTED, true),
                // Signalled already, or the waiter is being woken: merged.
                _ => return,
            };
            // AcqRel: release publishes the signaller's writes to the
            // waiter; acquire sees the waiter's g and sched.
            match self
                .state
                .compare_exchange_weak(s, to, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    if wake {
                        let sched = self.sched.load(Ordering::Relaxed);
                        // SAFETY: `wait` took a &'static Sched: it lives
                        // for good.
                        post(unsafe { &*sched }, &self.node);
                    }
                    return;
                }
                Err(now) => s = now,
            }
        }
    }
}

/// `gopark`'s unlock function for [`IrqEvent::wait`]: parks unless a
/// signal came meanwhile.
///
/// # Safety
///
/// `arg` points at the `(&IrqEvent, &mut bool)` in `wait`'s frame.
unsafe fn ev_commit(_gp: *mut G, arg: *mut ()) -> bool {
    // SAFETY: the contract.
    let (ev, parked) = unsafe { &mut *arg.cast::<(&IrqEvent, &mut bool)>() };
    // Release: the G's saved context and `g` happen before a signaller
    // that sees WAITING posts it.
    let ok = ev
        .state
        .compare_exchange(EV_EMPTY, EV_WAITING, Ordering::AcqRel, Ordering::Acquire)
        .is_ok();
    **parked = ok;
    ok
}

/// Drains a posted [`IrqEvent`]: readies its goroutine.
///
/// # Safety
///
/// `n` is the node of an `IrqEvent` in state `EV_POSTED`, just taken off
/// the injection list by the caller, an M of `_sched` holding a P.
unsafe fn ev_run(n: *const Node, _sched: &Sched) {
    let ev = n.cast::<IrqEvent>();
    // SAFETY: the contract (the node is the event's first field).
    unsafe {
        let gp = (*ev).g.swap(null_mut(), Ordering::Relaxed);
        // Release: a signal from now on is kept for the next wait.
        (*ev).state.store(EV_EMPTY, Ordering::Release);
        // The G parked in `wait` (its commit made the state WAITING, and
        // the signal that made it POSTED made us its one waker). Behind
        // the run queue, like a G a timer readies.
        crate::proc::ready::<false>(gp);
    }
}

// ---------------------------------------------------------------------
// IrqWork

/// [`IrqWork`]: not posted.
const WORK_IDLE: u32 = 0;
/// [`IrqWork`]: on an injection list.
const WORK_POSTED: u32 = 1;

/// A function an interrupt handler asks an M to run soon, on the M's
/// system stack: the second half of an interrupt (a bottom half, a
/// deferred procedure call).
///
/// Posting it again before it runs does nothing more (it runs once);
/// posting it while it runs makes it run again afterwards. Posted to a
/// scheduler with no M yet (no CPU joined, or hosted before its first
/// goroutine), it runs when the first M looks for work. The function
/// runs on g0 of an M holding a P: it must not block (see the [module
/// docs](self#where-the-work-runs)).
///
/// # Example
///
/// ```
/// use core::sync::atomic::{AtomicU32, Ordering};
/// use gokernel::intr::IrqWork;
/// use gokernel::platform::hosted::HOSTED;
/// use gokernel::runtime2::Sched;
///
/// static RAN: AtomicU32 = AtomicU32::new(0);
/// static WORK: IrqWork = IrqWork::new(|| {
///     RAN.fetch_add(1, Ordering::SeqCst);
/// });
/// let sched = Sched::leak(Sched::new(1, gokernel::stack::STACK_MIN, &HOSTED));
/// sched.go(Box::new(|| {})).unwrap(); // an M to run it
/// WORK.post(sched); // what a handler would call
/// while RAN.load(Ordering::SeqCst) == 0 {
///     std::thread::yield_now();
/// }
/// sched.shutdown();
/// ```
#[repr(C)]
pub struct IrqWork {
    node: Node,
    /// `WORK_IDLE` or `WORK_POSTED`.
    state: AtomicU32,
    /// The function.
    f: fn(),
}

impl IrqWork {
    /// A work item that runs `f` when posted.
    pub const fn new(f: fn()) -> Self {
        IrqWork {
            node: Node {
                next: AtomicPtr::new(null_mut()),
                run: work_run,
            },
            state: AtomicU32::new(WORK_IDLE),
            f,
        }
    }

    /// Asks an M of `sched` to run the function soon (once, however often
    /// it is posted before it runs).
    ///
    /// Interrupt-safe: no lock, no allocation (see the [module
    /// docs](self)).
    pub fn post(&'static self, sched: &'static Sched) {
        // AcqRel: publishes the poster's writes to the function's run.
        if self
            .state
            .compare_exchange(WORK_IDLE, WORK_POSTED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            post(sched, &self.node);
        }
    }
}

/// Drains a posted [`IrqWork`]: runs its function.
///
/// # Safety
///
/// `n` is the node of an `IrqWork` in state `WORK_POSTED`, just taken off
/// the injection list by the caller, on g0 of an M.
unsafe fn work_run(n: *const Node, _sched: &Sched) {
    let w = n.cast::<IrqWork>();
    // SAFETY: the contract (the node is the work item's first field).
    unsafe {
        // AcqRel: a post from now on runs it again; acquire sees what the
        // poster wrote before posting.
        (*w).state.swap(WORK_IDLE, Ordering::AcqRel);
        ((*w).f)();
    }
}
