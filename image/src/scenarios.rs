//! The scheduler scenarios of the hosted suite, shared by the
//! freestanding image (`image/`, a Linux process whose Ms are clone(2)
//! threads) and the reference kernel (`kernel/`, whose Ms are CPUs): both
//! include this file with `#[path]`. It depends only on gokernel, `spin`
//! and the includer's `say!` macro.
//!
//! The checks are driven either from a plain thread (the image's first
//! thread, which is not an M) or from a goroutine (the kernel's first
//! goroutine, every CPU being an M): [`run_g`] waits the right way for
//! each.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use core::time::Duration;

use gokernel::platform::Platform;
use gokernel::proc::{Parker, Stats, gosched, lock_os_thread, schedtrace, unlock_os_thread};
use gokernel::runtime2::Sched;
use gokernel::tls::fs0;

use crate::say;

/// What the scenarios run on: a scheduler and its platform.
#[derive(Clone, Copy)]
pub struct Host {
    pub sched: &'static Sched,
    pub platform: &'static dyn Platform,
    /// How many times longer than [`run_g`]'s time limits a scenario may
    /// take: an emulated machine on a loaded host needs more (each
    /// cross-CPU wake-up is a host thread's wake-up; a hand-off took
    /// 1-2 ms at a load average of 300).
    pub patience: u32,
}

/// Pass/fail tally.
pub struct Report {
    pub passed: u32,
    pub failed: u32,
}

impl Report {
    pub fn new() -> Self {
        Report {
            passed: 0,
            failed: 0,
        }
    }

    pub fn check(&mut self, name: &str, ok: bool, detail: core::fmt::Arguments) {
        if ok {
            self.passed += 1;
            say!("ok   {name}: {detail}");
        } else {
            self.failed += 1;
            say!("FAIL {name}: {detail}");
        }
    }
}

/// True on a goroutine (not a plain thread, not an M's g0).
pub fn on_goroutine() -> bool {
    let gp = gokernel::getg();
    // SAFETY: a non-null current G is live, and so is its M.
    !gp.is_null() && unsafe { (*(*gp).m()).curg() } == gp
}

/// Waits about `ms` milliseconds: a goroutine sleeps, a plain thread
/// sleeps on the platform's futex.
pub fn pause(h: Host, ms: u64) {
    if on_goroutine() {
        gokernel::sleep(Duration::from_millis(ms));
    } else {
        let zero = AtomicU32::new(0);
        h.platform.futexsleep(&zero, 0, Some(ms * 1_000_000));
    }
}

/// Runs `f` as a goroutine of `h.sched` and waits for its verdict; `None`
/// if it took more than `secs` × `h.patience` seconds. A plain thread waits on a futex;
/// a goroutine parks (woken by `f`'s goroutine, or every 100 ms by a
/// timer, to look at the clock).
pub fn run_g<T: Send + 'static>(
    h: Host,
    secs: u32,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let done = Arc::new(AtomicU32::new(0));
    let slot: Arc<spin::Mutex<Option<T>>> = Arc::new(spin::Mutex::new(None));
    // SAFETY: on a goroutine (checked first).
    let me = on_goroutine().then(|| unsafe { Parker::current() });
    let (d, s, m) = (done.clone(), slot.clone(), me.clone());
    h.sched
        .go(Box::new(move || {
            *s.lock() = Some(f());
            d.store(1, Ordering::Release);
            h.platform.futexwakeup(&d, 1);
            if let Some(m) = m {
                m.unpark();
            }
        }))
        .expect("spawn the scenario goroutine");
    let secs = secs * h.patience;
    let deadline = h.platform.nanotime() + u64::from(secs) * 1_000_000_000;
    while done.load(Ordering::Acquire) == 0 && h.platform.nanotime() < deadline {
        match &me {
            Some(me) => {
                let waker = me.clone();
                gokernel::time::after_func(Duration::from_millis(100), move || waker.unpark());
                // SAFETY: our own parker, on our goroutine.
                unsafe { me.park() };
            }
            None => h.platform.futexsleep(&done, 0, Some(100_000_000)),
        }
    }
    if done.load(Ordering::Acquire) == 1 {
        slot.lock().take()
    } else {
        say!(
            "  (no verdict after {secs} s: {})",
            schedtrace(&h.sched.stats(), 0)
        );
        None
    }
}

/// Parks the current G until `left` drops to zero (the last decrement
/// unparks it).
fn wait_zero(left: &AtomicUsize) {
    while left.load(Ordering::Acquire) != 0 {
        // SAFETY: on a goroutine; the parker is its own.
        unsafe { Parker::current().park() };
    }
}

/// Goroutines each spawner starts.
const CHILDREN: usize = 1000;

/// `spawners` goroutines each start [`CHILDREN`] goroutines and wait for
/// them; returns how many of them ran exactly once, and how many did not.
fn spawn_many(h: Host, spawners: usize) -> (usize, usize) {
    let total = spawners * CHILDREN;
    let seen: Arc<Vec<AtomicU8>> = Arc::new((0..total).map(|_| AtomicU8::new(0)).collect());
    let s2 = seen.clone();
    let r = run_g(h, 60, move || {
        // SAFETY: on a goroutine.
        let main = unsafe { Parker::current() };
        let left = Arc::new(AtomicUsize::new(spawners));
        for s in 0..spawners {
            let (seen, left, main) = (s2.clone(), left.clone(), main.clone());
            h.sched
                .go(Box::new(move || {
                    // SAFETY: on a goroutine.
                    let me = unsafe { Parker::current() };
                    let kids = Arc::new(AtomicUsize::new(CHILDREN));
                    for i in 0..CHILDREN {
                        let (seen, kids, me) = (seen.clone(), kids.clone(), me.clone());
                        h.sched
                            .go(Box::new(move || {
                                seen[s * CHILDREN + i].fetch_add(1, Ordering::Relaxed);
                                if kids.fetch_sub(1, Ordering::AcqRel) == 1 {
                                    me.unpark();
                                }
                            }))
                            .expect("spawn a child");
                    }
                    wait_zero(&kids);
                    if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                        main.unpark();
                    }
                }))
                .expect("spawn a spawner");
        }
        wait_zero(&left);
    });
    if r.is_none() {
        return (0, total);
    }
    let once = seen
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) == 1)
        .count();
    (once, total - once)
}

fn gosched_progress(h: Host) -> Option<u64> {
    run_g(h, 20, move || {
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        h.sched
            .go(Box::new(move || {
                gosched();
                f2.store(true, Ordering::Release);
            }))
            .expect("spawn the setter");
        let mut spins = 0u64;
        while !flag.load(Ordering::Acquire) && spins < 10_000_000 {
            gosched();
            spins += 1;
        }
        spins
    })
}

const ROUNDS: u64 = 10_000;

fn park_pingpong(h: Host) -> Option<(u64, u64)> {
    run_g(h, 20, move || {
        // SAFETY: on a goroutine.
        let main = unsafe { Parker::current() };
        let peer_count = Arc::new(AtomicU64::new(0));
        let peer_slot: Arc<spin::Mutex<Option<Arc<Parker>>>> = Arc::new(spin::Mutex::new(None));
        let (pc, ps, m2) = (peer_count.clone(), peer_slot.clone(), main.clone());
        h.sched
            .go(Box::new(move || {
                // SAFETY: on a goroutine.
                let me = unsafe { Parker::current() };
                *ps.lock() = Some(me.clone());
                for _ in 0..ROUNDS {
                    // SAFETY: our own parker.
                    unsafe { me.park() };
                    pc.fetch_add(1, Ordering::Relaxed);
                    m2.unpark();
                }
            }))
            .expect("spawn the peer");
        let peer = loop {
            if let Some(p) = peer_slot.lock().clone() {
                break p;
            }
            gosched();
        };
        let mut mine = 0;
        for _ in 0..ROUNDS {
            peer.unpark();
            // SAFETY: our own parker.
            unsafe { main.park() };
            mine += 1;
        }
        (mine, peer_count.load(Ordering::Relaxed))
    })
}

/// Two goroutines that can only finish if they run at the same time, on
/// two Ms; the second must have been stolen from the first's P.
fn parallel_and_stolen(h: Host) -> Option<bool> {
    run_g(h, 20, move || {
        let x = Arc::new(AtomicU32::new(0));
        let left = Arc::new(AtomicUsize::new(2));
        // SAFETY: on a goroutine.
        let main = unsafe { Parker::current() };
        let ok = Arc::new(AtomicBool::new(true));
        for p in 0..2u32 {
            let (x, left, main, ok) = (x.clone(), left.clone(), main.clone(), ok.clone());
            h.sched
                .go(Box::new(move || {
                    for i in 0..3u32 {
                        let expected = 2 * i + p;
                        let mut spins = 0u64;
                        while x.load(Ordering::SeqCst) != expected {
                            spins += 1;
                            if spins > 2_000_000_000 {
                                ok.store(false, Ordering::Relaxed);
                                break;
                            }
                            core::hint::spin_loop();
                        }
                        x.store(expected + 1, Ordering::SeqCst);
                    }
                    if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                        main.unpark();
                    }
                }))
                .expect("spawn");
        }
        wait_zero(&left);
        ok.load(Ordering::Relaxed)
    })
}

/// Sleep durations of the sleep-order check, in the order the goroutines
/// start (ms): each wakes in deadline order, not start order.
const SLEEPS_MS: [u64; 5] = [50, 10, 40, 20, 30];

/// Goroutines sleep for [`SLEEPS_MS`] × `scale` on the Ms; returns, in
/// wake-up order, each one's duration and whether it woke no earlier
/// than its deadline.
fn sleep_order(h: Host, scale: u64) -> Option<Vec<(u64, bool)>> {
    run_g(h, 20, move || {
        // SAFETY: on a goroutine.
        let main = unsafe { Parker::current() };
        let left = Arc::new(AtomicUsize::new(SLEEPS_MS.len()));
        let order: Arc<spin::Mutex<Vec<(u64, bool)>>> = Arc::new(spin::Mutex::new(Vec::new()));
        for ms in SLEEPS_MS.map(|ms| ms * scale) {
            let (left, main, order) = (left.clone(), main.clone(), order.clone());
            h.sched
                .go(Box::new(move || {
                    let deadline = h.platform.nanotime() + ms * 1_000_000;
                    gokernel::sleep(Duration::from_millis(ms));
                    let on_time = h.platform.nanotime() >= deadline;
                    order.lock().push((ms, on_time));
                    if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                        main.unpark();
                    }
                }))
                .expect("spawn a sleeper");
        }
        wait_zero(&left);
        order.lock().clone()
    })
}

/// The id of the M running the current goroutine.
fn m_id() -> i64 {
    // SAFETY: on a goroutine: its M is live.
    unsafe { (*(*gokernel::getg()).m()).id() }
}

/// A goroutine locked to its M keeps that M (the same id and TLS block)
/// across 1,000 yields and 1,000 parks; returns that, and the locked Ms
/// `stats` counted meanwhile.
fn locked_g(h: Host) -> Option<(bool, usize)> {
    run_g(h, 60, move || {
        lock_os_thread();
        let (m, tp) = (m_id(), fs0());
        let mut same = true;
        for _ in 0..1000 {
            gosched();
            same &= m_id() == m && fs0() == tp;
            // SAFETY: on a goroutine.
            let me = unsafe { Parker::current() };
            let waker = me.clone();
            h.sched
                .go(Box::new(move || waker.unpark()))
                .expect("spawn the waker");
            // SAFETY: our own parker.
            unsafe { me.park() };
            same &= m_id() == m && fs0() == tp;
        }
        let locked = h.sched.stats().locked_ms;
        unlock_os_thread();
        (same, locked)
    })
}

/// Channels, select and the sync types on 2 Ms: 4 producers send 10,000
/// numbers each over an unbuffered channel to 4 consumers that add them up
/// under a `Mutex`; a `WaitGroup` tells when they are done; a select
/// drains two buffered channels. Returns (sum, expected, selected).
fn chan_select_sync(h: Host) -> Option<(u64, u64, usize)> {
    use gokernel::sync::{Mutex, WaitGroup};
    const PER: u64 = 10_000;
    run_g(h, 30, move || {
        let c = gokernel::chan::<u64>(0);
        let total = Arc::new(Mutex::new(0u64));
        let wg = Arc::new(WaitGroup::new());
        for _ in 0..4 {
            wg.add(1);
            let (c, total, wg) = (c.clone(), total.clone(), wg.clone());
            h.sched
                .go(Box::new(move || {
                    for _ in 0..PER {
                        let v = c.recv().expect("the channel closed early");
                        *total.lock() += v;
                    }
                    wg.done();
                }))
                .expect("spawn a consumer");
        }
        for p in 0..4 {
            let c = c.clone();
            h.sched
                .go(Box::new(move || {
                    for i in 0..PER {
                        c.send(p * PER + i).expect("the channel closed");
                    }
                }))
                .expect("spawn a producer");
        }
        wg.wait();
        let n = 4 * PER;
        let expected = n * (n - 1) / 2;
        let (a, b) = (gokernel::chan::<u8>(8), gokernel::chan::<u8>(8));
        for _ in 0..8 {
            a.send(1).unwrap();
            b.send(2).unwrap();
        }
        let mut selected = 0;
        loop {
            let got = gokernel::select! {
                recv(a) -> v => v.is_ok(),
                recv(b) -> v => v.is_ok(),
                default => false,
            };
            if !got {
                break;
            }
            selected += 1;
        }
        let sum = *total.lock();
        (sum, expected, selected)
    })
}

/// Polls `h.sched.stats()` (up to 10 s) until only the `own` goroutines
/// (the driver, if it is one) are alive and every other P is idle.
fn quiescent_stats(h: Host, own: usize) -> Stats {
    for _ in 0..10_000 {
        let s = h.sched.stats();
        if s.idle_ps + own == s.procs && s.goroutines.live() == own {
            return s;
        }
        pause(h, 1);
    }
    h.sched.stats()
}

/// Runs the scheduler scenarios on `h`: `spawners` × 1,000 goroutines
/// spawned, yields, park/unpark hand-offs, two goroutines in parallel and
/// stealing (with 2 Ps or more), `lock_os_thread`, a quiescent `stats`,
/// channels with `select!` and the sync types, sleeps in deadline order
/// ([`SLEEPS_MS`] × `sleep_scale`: the gaps must outlast how late a
/// sleeping CPU may be scheduled, longer on an emulated machine).
pub fn run_all(h: Host, r: &mut Report, spawners: usize, sleep_scale: u64) {
    let own = usize::from(on_goroutine());
    let total = spawners * CHILDREN;
    let (once, bad) = spawn_many(h, spawners);
    let mut name = String::new();
    let _ = write!(name, "spawn-{total}");
    r.check(
        &name,
        once == total,
        format_args!(
            "{once} of {total} goroutines ran exactly once ({bad} did not), spawned from {spawners} goroutines"
        ),
    );
    let spins = gosched_progress(h);
    r.check(
        "gosched-progress",
        spins.is_some_and(|s| s < 10_000_000),
        format_args!("the spinning goroutine saw the flag after {spins:?} gosched calls"),
    );
    let pp = park_pingpong(h);
    r.check(
        "park-unpark-pingpong",
        pp == Some((ROUNDS, ROUNDS)),
        format_args!("{pp:?} hand-offs each way, {ROUNDS} expected"),
    );
    if h.sched.procs() >= 2 {
        let par = parallel_and_stolen(h);
        let stolen: u64 = h.sched.pstats().iter().map(|p| p.stolen).sum();
        r.check(
            "parallel-and-stolen",
            par == Some(true) && stolen > 0,
            format_args!("two goroutines ran at once: {par:?}; Gs stolen between Ps: {stolen}"),
        );
    } else {
        say!("skip parallel-and-stolen: one P, so nothing runs in parallel");
    }
    if h.sched.procs() < 2 && !h.platform.starts_threads() {
        // The locked goroutine's CPU runs only it, and the goroutine that
        // unparks it needs another CPU (gokernel::cpu).
        say!(
            "skip lock-os-thread: one CPU and no threads, so a locked goroutine that parks waits for good"
        );
    } else {
        let locked = locked_g(h);
        r.check(
            "lock-os-thread",
            locked == Some((true, 1)),
            format_args!(
                "(same M and TLS block across 1,000 goscheds and parks, locked Ms) = {locked:?}"
            ),
        );
    }
    let s = quiescent_stats(h, own);
    let queued = s.runqueue + s.ps.iter().map(|p| p.runq_len).sum::<usize>();
    r.check(
        "stats",
        s.idle_ps + own == s.procs && s.goroutines.live() == own && queued == 0 && s.locked_ms == 0,
        format_args!("{}", schedtrace(&s, 0)),
    );

    let css = chan_select_sync(h);
    r.check(
        "chan-select-sync",
        css.is_some_and(|(sum, expected, selected)| sum == expected && selected == 16),
        format_args!(
            "(sum, expected, values drained by select) = {css:?}, over an unbuffered channel, a Mutex and a WaitGroup"
        ),
    );

    let order = sleep_order(h, sleep_scale);
    let mut sorted = SLEEPS_MS.map(|ms| ms * sleep_scale);
    sorted.sort_unstable();
    r.check(
        "sleep-order",
        order.as_ref().is_some_and(|o| {
            o.iter().map(|w| w.0).eq(sorted.iter().copied()) && o.iter().all(|w| w.1)
        }),
        format_args!(
            "goroutines sleeping {:?} ms woke as (ms, not before the deadline) {order:?}",
            SLEEPS_MS.map(|ms| ms * sleep_scale)
        ),
    );
}
