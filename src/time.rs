//! Timers (Go's `time.go`): a timer heap per P, [`sleep`], [`after_func`],
//! and the idle M that sleeps until the next deadline.
//!
//! # Design
//!
//! A timer is a deadline `when` (a reading of
//! [`Platform::nanotime`](crate::platform::Platform::nanotime)), a sequence
//! number that keeps timers with equal deadlines first in, first out, and
//! an action: make a parked G runnable ([`sleep`]) or call a function on
//! g0 ([`after_func`]; channels' `after` builds on it).
//!
//! Each P keeps its timers in a 4-ary min-heap (Go's layout) under a lock
//! of its own, with the earliest deadline copied into `timer0_when`, an
//! atomic anyone can read without the lock (0: no timers). `addtimer` puts
//! a timer on the heap of the P the caller holds (from a thread that holds
//! none, on P 0). Any M may run any P's expired timers:
//!
//! - `findrunnable` runs the current P's expired timers first; when the
//!   P has none, that costs one relaxed load and a compare, so `gosched`
//!   and the other hot paths stay as cheap as they were;
//! - before it steals, it runs the expired timers of every P (Go's
//!   `stealWork` does the same): a P that went idle, or whose M is busy,
//!   keeps its heap, and the Gs those timers ready come to this M's queue;
//! - an M with nothing to do sleeps until the earliest deadline of all
//!   the heaps instead of sleeping for good (below).
//!
//! # The timer sleeper
//!
//! Go lets one idle M block in the network poller until the next timer
//! (`sched.pollUntil`) and interrupts it with `netpollBreak` when an
//! earlier timer appears (`wakeNetPoller`). Without a network poller, the
//! sleeper here waits on a futex word of its own, `TimerPoll::wake`, with
//! a timeout. One word, `TimerPoll::poll_until`, says what it is doing:
//!
//! - `0`: no M sleeps for timers;
//! - `POLL_PENDING` (`u64::MAX`): an M holds the post and is reading the
//!   deadlines: every new timer must wake it;
//! - any other value: the M sleeps until that time.
//!
//! An M that finds no work, has given its P back and has done the spinning
//! M's last checks (see [`proc`](crate::proc)) calls `timersleep`. If any P
//! has a timer, it tries to take the post (compare-and-swap `0` →
//! `POLL_PENDING`); if another M holds it, it stops for good (`stopm`),
//! because that M will look after every timer. The holder loops: read
//! `wake`, read the earliest deadline `next` of all Ps, store `next` in
//! `poll_until`, sleep on `wake` until `next`, store `POLL_PENDING` again.
//! When a deadline has passed it gives up the post and takes an idle P as
//! a *spinning* M, so that `findrunnable` runs the expired timers and,
//! having found work, wakes another M (`resetspinning` → `wakep`) to take
//! over the post for the timers left. With no idle P it stops for good,
//! and does not spin: the Ms holding the Ps run timers in `schedule`, and
//! the next of them to give up its P takes the post (or, for an M whose
//! locked G parks, `handoffp` wakes an M that does).
//!
//! `addtimer` stores the new `timer0_when`, then reads `poll_until`
//! (Go's `wakeNetPoller`): `0` → `wakep`, so that some M wakes up and
//! takes the post; a value later than the new deadline (including
//! `POLL_PENDING`) → bump `wake` and wake the sleeper (`netpollbreak`);
//! otherwise the sleeper will wake before the new deadline and see it.
//!
//! # No lost wake-up
//!
//! Every access below is sequentially consistent, so all of them fall in
//! one total order. The adder stores `timer0_when` and then loads
//! `poll_until`; the sleeper stores `poll_until` (the compare-and-swap
//! that takes the post, `POLL_PENDING` after each sleep, `0` when it
//! leaves) and then loads every `timer0_when`. In each pair of a store
//! followed by a load, at least one side sees the other — the same
//! argument as `nmspinning` and the run queues in [`proc`](crate::proc).
//!
//! - The adder reads `0`. Its store precedes any later taking of the post,
//!   so the next holder's scan sees the timer. And `wakep` makes sure an
//!   M looks: it starts one if a P is idle and no M spins; a spinning M
//!   scans after its SeqCst decrement of `nmspinning`, which comes after
//!   the adder's read of it (or, finding work, calls `wakep` in turn
//!   first, which is this case again); with no P idle, the M that idles a
//!   P next scans after its `npidle` increment (point 2 below), which
//!   comes after the adder's read of `npidle`.
//! - The adder reads `POLL_PENDING`: it wakes the sleeper. The sleeper read
//!   `wake` before it looked at the deadlines, so the bump makes its
//!   `futexsleep` return at once, or wakes it, and it looks again. If it
//!   has left the post meanwhile (no timers seen), it stored `0` after the
//!   adder's read and scans once more before it stops: it sees the timer.
//! - The adder reads a deadline `d`: the sleeper stored `d` after its scan
//!   and stores `POLL_PENDING` again only after its sleep, so the adder's
//!   read comes before that store and before the next scan, which sees the
//!   timer. If the new deadline is before `d`, the adder woke it; if not,
//!   the sleeper wakes at `d`, no later than the new deadline. If it then
//!   leaves the post to run the timers due, it does so as a spinning M,
//!   and spinning Ms hand the search on (`resetspinning` → `wakep`) before
//!   they run a G, so the timer left behind falls under the first case.
//!   If it finds no idle P, it read `npidle` after its store of `0`, so
//!   the next M to idle a P increments `npidle` after that, and scans
//!   after that.
//! - An M that finds the post taken stops for good. The holder scans after
//!   the compare-and-swap that made it holder; a timer stored before that
//!   is in its scan, and a timer stored after it is the adder's to
//!   announce (the cases above).
//! - Shutdown stores `stopping`, then bumps `wake`; the sleeper reads
//!   `wake` before `stopping` each round, so it either sees `stopping` or
//!   sleeps on a stale value and returns at once.
//!
//! # What the argument needs from the rest of the scheduler
//!
//! Two things, which every change to how Ps move between Ms must keep:
//!
//! 1. Every M that takes a P off the idle list is a spinning M (`wakep`'s
//!    `startm`, `spin_on_idle_p`), so it scans, or hands the search on,
//!    as above.
//! 2. Every M that puts a P on the idle list scans every heap after its
//!    SeqCst increment of `npidle` and acts on what it sees:
//!    `findrunnable`'s M in `timersleep`, and `handoffp`, which scans
//!    and then calls `wakenetpoller` as an adder would (Go's `handoffp`
//!    does the same). An adder or a hand-on `wakep` that read `npidle`
//!    before that increment is thus covered by the scan after it.
//!
//! LockOSThread and bound Gs (see [`crate::bound`]) move Ps in two more
//! ways, both to Ms that do not spin: `handoffp` starts an M on the P of a
//! parked locked G when there is work (`startm(pp, false)`), and an M
//! waiting on `mwantp` is given a P by `pidleput` or by an M at a
//! scheduling point (`bound::handoff_wanted`). Neither P is ever idle —
//! `npidle` does not change — so neither point is touched: the M runs
//! `findrunnable` on the P (its timers first) or its locked G, like any M
//! holding a P, and when that G parks the P leaves through `handoffp`. An
//! M asleep in `stoplockedm` holds no P and never sleeps for timers; when
//! its own G sleeps, the timer readies the G on whichever M runs it, which
//! wakes the locked M with an idle P or puts it on `mwantp`. The timer
//! sleeper itself may have bound Gs: it marks itself `TIMER` and looks at
//! its inbox before each sleep, and a waker that sees the mark breaks the
//! sleep (`netpollbreak`).
//!
//! `checkdead`, called when a P is idled last (by either path), sees
//! pending timers and reports nothing; point 2 means an M will run them,
//! and the last M to idle a P after they have fired reports a deadlock if
//! one is left. It decides under the scheduler lock, with every P still
//! idle: an M running timers holds a P, and has taken them off their
//! heaps before it readies their Gs, so a check made while every P was
//! idle a moment before (`handoffp` has just woken such an M) could see
//! neither a timer nor a runnable G and report a deadlock that is not one
//! (seen under load, before the lock was taken there).
//!
//! Point 2 did not hold for `handoffp` at first, and this lost a timer
//! (`tests/lockosthread.rs` saw it within 2,000 rounds): the timer
//! sleeper wakes for one timer and takes the idle P as a spinning M; a
//! locked G on the other P sleeps, and its `addtimer` sees no sleeper and
//! no idle P; its M's `handoffp` sees the spinning M and puts the P on
//! the idle list; but in between the spinning M had run the expired
//! timer, and its hand-on `wakep`, reading `npidle` before that
//! `pidleput`, had started nobody. The P sat idle with the timer on its
//! heap, no M sleeping for it and none spinning, while the spinning M ran
//! a G that waited for the timer without yielding.
//!
//! # Limits
//!
//! - There is no preemption. A timer fires when an M looks at it: at the
//!   next `schedule` on its P, at the next `schedule` of any M that has
//!   run out of queued work, or when the timer sleeper wakes — which needs
//!   an idle P. A timer on a busy P whose
//!   M never yields fires on time only if another P is idle (the sleeper
//!   takes it); with every P held by a G that never yields it fires late,
//!   when one of them yields, parks or ends.
//! - With the post held by a sleeping M that is not on the idle M list,
//!   new work may start one extra M (a thread) beside it.
//! - Timers cannot be stopped or reset; `after_func` callbacks run on g0
//!   and must not block or panic.
//! - When the runtime shuts down, timers that have not fired are dropped
//!   without running: sleeping goroutines stay parked, like every other
//!   parked goroutine of a stopped runtime, and callbacks are dropped.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use core::time::Duration;

use crate::proc::{gopark, ready, spin_on_idle_p, wakep};
use crate::runtime2::{G, M, P, Sched, WaitReason};
use crate::tls::getg;

/// What a timer does when it fires.
pub(crate) enum TimerFn {
    /// Makes this G, parked by [`sleep`], runnable.
    Ready(*mut G),
    /// Runs this on g0 of the M that finds the timer expired, holding a P.
    /// It must not block (it may make Gs runnable).
    Call(Box<dyn FnOnce() + Send + 'static>),
}

/// One timer on a P's heap (Go's `timer`).
struct Timer {
    /// The deadline, a `nanotime` reading, `1..=MAX_WHEN`.
    when: u64,
    /// Insertion order on its heap: FIFO among equal deadlines.
    seq: u64,
    /// What to do.
    f: TimerFn,
}

// SAFETY: a `Ready` timer's G is parked and belongs to whoever fires the
// timer, on any M; a `Call` closure is `Send`.
unsafe impl Send for Timer {}

impl Timer {
    /// The heap order: deadline, then insertion.
    fn key(&self) -> (u64, u64) {
        (self.when, self.seq)
    }
}

/// The latest deadline a timer may have: `u64::MAX` is `POLL_PENDING`.
const MAX_WHEN: u64 = u64::MAX - 1;

/// `TimerPoll::poll_until` while the sleeper reads the deadlines.
const POLL_PENDING: u64 = u64::MAX;

/// The heap behind [`Timers`]' lock.
struct TimerHeap {
    /// A 4-ary min-heap on [`Timer::key`].
    heap: Vec<Timer>,
    /// The next sequence number.
    seq: u64,
}

/// A P's timers (Go's `p.timers` and `p.timer0When`).
pub(crate) struct Timers {
    /// The heap. Any M may lock it; nobody runs a timer with it held.
    heap: spin::Mutex<TimerHeap>,
    /// The earliest deadline on the heap, 0 if it is empty. Written under
    /// the lock, read without it.
    timer0_when: AtomicU64,
}

impl Timers {
    /// No timers.
    pub(crate) const fn new() -> Self {
        Timers {
            heap: spin::Mutex::new(TimerHeap {
                heap: Vec::new(),
                seq: 0,
            }),
            timer0_when: AtomicU64::new(0),
        }
    }
}

/// The scheduler's timer sleeper (Go's `sched.pollUntil` and the wake-up
/// of `netpollBreak`); see the module docs.
pub(crate) struct TimerPoll {
    /// `0`, `POLL_PENDING`, or the deadline the sleeper sleeps until.
    poll_until: AtomicU64,
    /// The futex word the sleeper sleeps on; bumped to wake it.
    wake: AtomicU32,
}

impl TimerPoll {
    /// Nobody sleeping.
    pub(crate) const fn new() -> Self {
        TimerPoll {
            poll_until: AtomicU64::new(0),
            wake: AtomicU32::new(0),
        }
    }
}

// ---------------------------------------------------------------------
// The heap (Go's siftupTimer / siftdownTimer, 4-ary).

/// Moves the timer at `i` up to its place.
fn siftup_timer(t: &mut [Timer], mut i: usize) {
    while i > 0 {
        let p = (i - 1) / 4;
        if t[i].key() >= t[p].key() {
            break;
        }
        t.swap(i, p);
        i = p;
    }
}

/// Moves the timer at `i` down to its place.
fn siftdown_timer(t: &mut [Timer], mut i: usize) {
    loop {
        let c = 4 * i + 1;
        if c >= t.len() {
            return;
        }
        let end = (c + 4).min(t.len());
        let m = (c..end).min_by_key(|&j| t[j].key()).unwrap_or(c);
        if t[m].key() >= t[i].key() {
            return;
        }
        t.swap(i, m);
        i = m;
    }
}

/// Adds `t` to the heap (Go's `doaddtimer`).
fn doaddtimer(ts: &mut TimerHeap, when: u64, f: TimerFn) {
    ts.seq += 1;
    ts.heap.push(Timer {
        when,
        seq: ts.seq,
        f,
    });
    let last = ts.heap.len() - 1;
    siftup_timer(&mut ts.heap, last);
}

/// Removes the earliest timer (Go's `dodeltimer0`). The heap is not empty.
fn dodeltimer0(ts: &mut TimerHeap) -> Timer {
    let t = ts.heap.swap_remove(0);
    siftdown_timer(&mut ts.heap, 0);
    t
}

/// Copies the heap's earliest deadline to `timer0_when` (Go's
/// `updateTimer0When`). Under the heap's lock.
fn updatetimer0when(timers: &Timers, ts: &TimerHeap) {
    let when = ts.heap.first().map_or(0, |t| t.when);
    // SeqCst: a new deadline is stored before addtimer reads poll_until,
    // pairing with the sleeper's stores to poll_until before its scans
    // (module docs).
    timers.timer0_when.store(when, Ordering::SeqCst);
}

// ---------------------------------------------------------------------
// Adding and running timers.

/// The P a new timer goes on: the caller's, if it is an M of `sched`
/// holding one, else P 0.
fn timerp(sched: &Sched) -> *mut P {
    let gp = getg();
    if !gp.is_null() {
        // SAFETY: a non-null current G has a live M; the M's P does not
        // change while code runs on it (no preemption).
        let (rt, pp) = unsafe { ((*(*gp).m).rt, (*(*gp).m).p) };
        if core::ptr::eq(rt, sched) && !pp.is_null() {
            return pp;
        }
    }
    sched.allp[0]
}

/// Adds a timer firing at `when` (a `nanotime` reading) to the current P's
/// heap (Go's `addtimer`), and makes sure some M will look at it (Go's
/// `wakeNetPoller`). On a stopping scheduler the timer is dropped instead.
pub(crate) fn addtimer(sched: &Sched, when: u64, f: TimerFn) {
    if sched.stopping.load(Ordering::SeqCst) {
        // No M runs timers any more; a Call closure is dropped here.
        return;
    }
    let when = when.clamp(1, MAX_WHEN);
    let pp = timerp(sched);
    // SAFETY: Ps live as long as their scheduler; only the timers, which
    // are shared (lock and atomic), are borrowed.
    let timers = unsafe { &(*pp).timers };
    {
        let mut ts = timers.heap.lock();
        doaddtimer(&mut ts, when, f);
        updatetimer0when(timers, &ts);
    }
    wakenetpoller(sched, when);
}

/// A new timer fires at `when`: make sure an M will look at the timers by
/// then (Go's `wakeNetPoller`; the "net poller" is the timer sleeper). See
/// the module docs for why no wake-up is lost.
pub(crate) fn wakenetpoller(sched: &Sched, when: u64) {
    // SeqCst: after addtimer's store of timer0_when; pairs with the
    // sleeper's stores of poll_until before its scans.
    let until = sched.timerpoll.poll_until.load(Ordering::SeqCst);
    if until == 0 {
        wakep(sched);
    } else if when < until {
        netpollbreak(sched);
    }
}

/// Wakes the timer sleeper, or makes its next sleep return at once (Go's
/// `netpollBreak`).
pub(crate) fn netpollbreak(sched: &Sched) {
    let tp = &sched.timerpoll;
    // SeqCst: the sleeper reads `wake` (SeqCst) before it looks at the
    // timers and at `stopping`; a bump after that read changes the value
    // its futexsleep compares.
    tp.wake.fetch_add(1, Ordering::SeqCst);
    sched.platform.futexwakeup(&tp.wake, 1);
}

/// Runs P `pp`'s expired timers if it has any (Go's `checkTimers`).
/// `now` is a `nanotime` reading, or 0 to read the clock only if `pp` has
/// timers. Returns the reading used (still 0 if none was needed) and
/// whether a timer ran.
///
/// On g0 of an M of `sched` holding a P (any P's timers: the Gs they ready
/// go on the caller's P).
#[inline]
pub(crate) fn checktimers(sched: &Sched, pp: *mut P, now: u64) -> (u64, bool) {
    // SAFETY: Ps live as long as their scheduler; only the shared timers
    // are borrowed.
    let timers = unsafe { &(*pp).timers };
    // Relaxed: a hint. A timer this misses is one the idle-M protocol
    // covers (module docs); the heap itself is read under its lock.
    let next = timers.timer0_when.load(Ordering::Relaxed);
    if next == 0 {
        return (now, false);
    }
    runtimers(sched, timers, next, now)
}

/// The slow half of [`checktimers`]: `next` is non-zero.
#[inline(never)]
fn runtimers(sched: &Sched, timers: &Timers, next: u64, now: u64) -> (u64, bool) {
    let now = if now == 0 {
        sched.platform.nanotime()
    } else {
        now
    };
    if next > now {
        return (now, false);
    }
    let mut ran = false;
    loop {
        let t = {
            let mut ts = timers.heap.lock();
            match ts.heap.first() {
                Some(t) if t.when <= now => {}
                _ => break,
            }
            let t = dodeltimer0(&mut ts);
            updatetimer0when(timers, &ts);
            t
        };
        // Without the lock: the action may add timers (to this heap too).
        runtimer(t.f);
        ran = true;
    }
    (now, ran)
}

/// Does what a fired timer says (Go's `runOneTimer`).
fn runtimer(f: TimerFn) {
    match f {
        // SAFETY: the G parked in sleep and handed itself to this timer
        // (resetforsleep); the timer has just left its heap, so it is
        // readied once. It goes behind the queue, so Gs whose timers fire
        // together run in deadline order.
        TimerFn::Ready(gp) => unsafe { ready::<false>(gp) },
        TimerFn::Call(f) => calltimer(f),
    }
}

/// Runs a callback timer. Hosted, a panic cannot unwind through the
/// scheduler: it is a fatal error.
#[cfg(feature = "std")]
fn calltimer(f: Box<dyn FnOnce() + Send + 'static>) {
    if std::panic::catch_unwind(core::panic::AssertUnwindSafe(f)).is_err() {
        crate::panic::throw(
            "a timer function panicked (message above); after_func callbacks run on the scheduler's stack and must not panic",
        );
    }
}

/// Runs a callback timer (a panic goes to the embedder's panic handler).
#[cfg(not(feature = "std"))]
fn calltimer(f: Box<dyn FnOnce() + Send + 'static>) {
    f()
}

/// The earliest deadline over every P's heap, 0 if there are no timers
/// (Go's `timeSleepUntil`).
pub(crate) fn timesleepuntil(sched: &Sched) -> u64 {
    let mut next = 0;
    for &pp in &sched.allp {
        // SAFETY: Ps live as long as their scheduler; only the shared
        // timers are borrowed.
        let timers = unsafe { &(*pp).timers };
        // SeqCst: the scans of the timer sleeper and of an M going idle
        // pair with addtimer's store (module docs).
        let w = timers.timer0_when.load(Ordering::SeqCst);
        if w != 0 && (next == 0 || w < next) {
            next = w;
        }
    }
    next
}

/// What [`timersleep`] did.
pub(crate) enum Polled {
    /// There are no timers, or another M sleeps for them: stop the M.
    Nothing,
    /// A timer is due and the M took an idle P, as a spinning M: look for
    /// work again.
    GotP,
    /// The scheduler is stopping (the M holds no P).
    Stopping,
}

/// Why the timer sleeper stopped sleeping.
enum Woke {
    Due,
    /// A G bound to the sleeping M became runnable (see crate::bound).
    Home,
    Empty,
    Stopping,
}

/// An idle M with timers pending sleeps until the earliest deadline, if no
/// other M already does (Go's "poll network until next timer" in
/// `findRunnable`). See the module docs for the protocol and why no
/// wake-up is lost.
///
/// On g0 of `mp`, which holds no P and is not spinning, after
/// `findrunnable`'s last checks.
pub(crate) fn timersleep(sched: &Sched, mp: *mut M) -> Polled {
    let tp = &sched.timerpoll;
    loop {
        if timesleepuntil(sched) == 0 {
            return Polled::Nothing;
        }
        // One sleeper at a time. SeqCst: pairs with wakenetpoller's load
        // (module docs).
        if tp
            .poll_until
            .compare_exchange(0, POLL_PENDING, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            // The holder looks after every timer, this one included.
            return Polled::Nothing;
        }
        // SeqCst store, then has_bound_work's SeqCst load below: the M's
        // half of the wake-up argument in crate::bound (a waker that sees
        // TIMER calls netpollbreak).
        // SAFETY: mp is this thread's M.
        unsafe { (*mp).sleeping.store(crate::bound::TIMER, Ordering::SeqCst) };
        let woke = loop {
            // SeqCst, and before the checks: a wake-up after this read
            // makes the futexsleep below return at once.
            let seen = tp.wake.load(Ordering::SeqCst);
            if sched.stopping.load(Ordering::SeqCst) {
                break Woke::Stopping;
            }
            // SAFETY: as above.
            if unsafe { crate::bound::has_bound_work(mp) } {
                break Woke::Home;
            }
            let next = timesleepuntil(sched);
            if next == 0 {
                break Woke::Empty;
            }
            let now = sched.platform.nanotime();
            if next <= now {
                break Woke::Due;
            }
            // SeqCst: adders that read this deadline leave later timers
            // to us; the store of POLL_PENDING after the sleep comes
            // before our next scan.
            tp.poll_until.store(next, Ordering::SeqCst);
            sched.platform.futexsleep(&tp.wake, seen, Some(next - now));
            tp.poll_until.store(POLL_PENDING, Ordering::SeqCst);
        };
        // Leave the post (SeqCst: from here on adders wake Ms with wakep),
        // then deal with what is left.
        tp.poll_until.store(0, Ordering::SeqCst);
        // SAFETY: as above.
        unsafe { (*mp).sleeping.store(crate::bound::AWAKE, Ordering::Relaxed) };
        match woke {
            Woke::Stopping => return Polled::Stopping,
            // Scan again: a timer whose adder saw POLL_PENDING (and only
            // woke us) is seen now.
            Woke::Empty => continue,
            // A G of this M's own became runnable (Home), or a timer is
            // due: take an idle P as a spinning M, as Due always did. For
            // Home this matters as much: the timers we leave behind are
            // pending, and a spinning M that finds work (here, our own G)
            // hands the search on with wakep (resetspinning), so another
            // M takes the post. Taking the P in stopm instead, not
            // spinning, left them with no sleeper while a P stayed idle
            // (seen: a locked goroutine's sleep never ended while the main
            // goroutine spun, tests/lockosthread.rs). With no idle P,
            // stopm finds our Gs and waits for one on mwantp.
            Woke::Home | Woke::Due => {
                // SeqCst: an M that idled a P and then found the post
                // taken incremented npidle before; we see its P.
                if sched.npidle.load(Ordering::SeqCst) != 0
                    && spin_on_idle_p(&mut sched.lock.lock(), sched, mp)
                {
                    return Polled::GotP;
                }
                // Every P is held: their Ms run timers in schedule, and
                // the next to go idle takes the post. Do not spin.
                return Polled::Nothing;
            }
        }
    }
}

/// Drops every timer without running it. At shutdown, after the Ms have
/// exited.
pub(crate) fn cleartimers(sched: &Sched) {
    for &pp in &sched.allp {
        // SAFETY: Ps live as long as their scheduler; only the shared
        // timers are borrowed.
        let timers = unsafe { &(*pp).timers };
        let dropped = {
            let mut ts = timers.heap.lock();
            let all = core::mem::take(&mut ts.heap);
            updatetimer0when(timers, &ts);
            all
        };
        // Outside the lock: a closure's captures may do anything on drop.
        drop(dropped);
    }
}

// ---------------------------------------------------------------------
// The public API.

/// The scheduler of the current goroutine.
///
/// # Panics
///
/// Outside a goroutine of a scheduler.
#[track_caller]
fn cursched(what: &str) -> *const Sched {
    let gp = crate::proc::require_user_g(what);
    // SAFETY: a user G of a scheduler has a live M with that scheduler.
    unsafe { (*(*gp).m).rt }
}

/// The deadline `d` from now on `sched`'s clock.
fn deadline(sched: &Sched, d: Duration) -> u64 {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    sched.platform.nanotime().saturating_add(ns)
}

/// Blocks the current goroutine for at least `d` (Go's `time.Sleep`): it
/// parks, and a timer on its P makes it runnable again after the deadline;
/// the M runs other goroutines meanwhile, or sleeps if there are none.
///
/// `sleep(Duration::ZERO)` yields instead, like [`gosched`](crate::proc::gosched).
/// How late it wakes depends on the Ms: see the module docs' limits.
///
/// On a plain thread (not a goroutine) it blocks the thread with
/// `std::thread::sleep`, as channel operations do there.
///
/// # Panics
///
/// On a plain thread without the `std` feature (the crate cannot put an
/// arbitrary thread to sleep), or on an M's own stack (g0).
///
/// # Example
///
/// ```
/// # #[cfg(feature = "std")] {
/// use std::time::{Duration, Instant};
///
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// let slept = rt.block_on(|| {
///     let t = Instant::now();
///     gokernel::sleep(Duration::from_millis(20));
///     t.elapsed()
/// });
/// assert!(slept.unwrap() >= Duration::from_millis(20));
/// # }
/// ```
#[track_caller]
pub fn sleep(d: Duration) {
    if getg().is_null() {
        // A plain thread (not an M): channels work there, so sleep does
        // too, by blocking the thread.
        #[cfg(feature = "std")]
        {
            std::thread::sleep(d);
            return;
        }
        #[cfg(not(feature = "std"))]
        panic!(
            "gokernel::sleep called outside a goroutine of a gokernel runtime: \
             without the std feature a plain thread cannot be put to sleep"
        );
    }
    // SAFETY: a goroutine's scheduler outlives it.
    let sched = unsafe { &*cursched("sleep") };
    if d.is_zero() {
        crate::proc::gosched();
        return;
    }
    let mut when = deadline(sched, d);
    // SAFETY: on a user G of a scheduler M (cursched checked); `when`
    // lives on this G's stack, which stays intact while it is parked, and
    // resetforsleep reads it before anything can ready the G.
    unsafe { gopark(resetforsleep, (&raw mut when).cast(), WaitReason::Sleep) };
}

/// `gopark`'s unlock function for [`sleep`] (Go's `resetForSleep`): puts
/// the sleeping G's timer on the heap, now that the G is parked, so the
/// timer cannot ready a G that is still running.
///
/// # Safety
///
/// On g0 of the M that parked `gp` (it holds a P); `arg` points at the
/// deadline on `gp`'s stack.
unsafe fn resetforsleep(gp: *mut G, arg: *mut ()) -> bool {
    // SAFETY: the contract: arg is live while gp is parked, and we are on
    // g0 of a scheduler M.
    let (when, sched) = unsafe { (*arg.cast::<u64>(), &*(*(*getg()).m).rt) };
    addtimer(sched, when, TimerFn::Ready(gp));
    true
}

/// Calls `f` once, at least `d` from now (like Go's `time.AfterFunc`, but
/// `f` runs on the scheduler's own stack, g0, not in a goroutine of its
/// own): it must be short and must not block, park or panic. It may make
/// goroutines runnable (unpark them, or send on a channel without
/// blocking) and start goroutines — which is how a callback does anything
/// longer. The timer cannot be stopped; if the runtime shuts down first,
/// `f` is dropped without running.
///
/// # Panics
///
/// Outside a goroutine of a gokernel runtime.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "std")] {
/// use std::time::Duration;
///
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// let woken = rt.block_on(|| {
///     let me = gokernel::current();
///     gokernel::time::after_func(Duration::from_millis(10), move || me.unpark());
///     gokernel::park(); // the callback unparks us
///     true
/// });
/// assert_eq!(woken, Ok(true));
/// # }
/// ```
#[track_caller]
pub fn after_func(d: Duration, f: impl FnOnce() + Send + 'static) {
    after_func_as("after_func", d, f);
}

/// [`after_func`], naming `what` when called outside a goroutine.
#[track_caller]
fn after_func_as(what: &str, d: Duration, f: impl FnOnce() + Send + 'static) {
    // SAFETY: a goroutine's scheduler outlives it.
    let sched = unsafe { &*cursched(what) };
    addtimer(sched, deadline(sched, d), TimerFn::Call(Box::new(f)));
}

/// A channel on which one `()` arrives after `d` (Go's `time.After`): the
/// timeout case of a `select`. The channel has room for the value, so the
/// timer never waits for a receiver; nobody has to receive it.
///
/// # Panics
///
/// Outside a goroutine of a gokernel runtime.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "std")] {
/// use std::time::Duration;
/// use gokernel::{after, chan, select};
///
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// let timed_out = rt.block_on(|| {
///     let never = chan::<u32>(0);
///     select! {
///         recv(never) -> _v => false,
///         recv(after(Duration::from_millis(10))) -> _t => true,
///     }
/// });
/// assert_eq!(timed_out, Ok(true));
/// # }
/// ```
#[track_caller]
pub fn after(d: Duration) -> crate::chan::Chan<()> {
    let c = crate::chan::chan::<()>(1);
    let tx = c.clone();
    after_func_as("after", d, move || {
        // Room for one value, and only this timer sends: never blocks.
        let _ = tx.try_send(());
    });
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heap_pops_by_deadline_and_equal_deadlines_first_in_first_out() {
        let mut ts = TimerHeap {
            heap: Vec::new(),
            seq: 0,
        };
        // 1,000 timers over 37 distinct deadlines, in a scrambled order.
        for i in 0..1000u64 {
            let when = 1 + (i * 7919) % 37;
            doaddtimer(&mut ts, when, TimerFn::Call(Box::new(|| {})));
        }
        let mut last = (0, 0);
        for _ in 0..1000 {
            let t = dodeltimer0(&mut ts);
            assert!(t.key() > last, "{:?} came out after {last:?}", t.key());
            last = t.key();
        }
        assert!(ts.heap.is_empty());
    }
}
