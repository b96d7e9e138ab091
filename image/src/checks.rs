//! The scheduler scenarios of the hosted suite, on 2 Ms made by clone(2)
//! (or, with `--cpus`, on 2 CPUs that joined, under a storm of simulated
//! interrupts: see `cpus.rs`), plus the checks only a freestanding image
//! can make (TLS template, FS base, per-M slots).

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use core::time::Duration;

use gokernel::platform::Platform;
use gokernel::proc::{Parker, Stats, gosched, lock_os_thread, schedtrace, unlock_os_thread};
use gokernel::runtime2::Sched;
use gokernel::tls::{FsBaseMode, fs0};

use crate::platform::{IMAGE, M_RECORDS, NEWOSPROC_CALLS, NRECORDS};
use crate::{Boot, cpus, say, sys};

/// Pass/fail tally.
struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: core::fmt::Arguments) {
        if ok {
            self.passed += 1;
            say!("ok   {name}: {detail}");
        } else {
            self.failed += 1;
            say!("FAIL {name}: {detail}");
        }
    }
}

/// Runs `f` as a goroutine of `sched` and waits (on a futex) for its
/// verdict; `None` if it took more than `secs` seconds.
pub(crate) fn run_g<T: Send + 'static>(
    sched: &Sched,
    secs: u32,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let done = Arc::new(AtomicU32::new(0));
    let slot: Arc<spin::Mutex<Option<T>>> = Arc::new(spin::Mutex::new(None));
    let (d, s) = (done.clone(), slot.clone());
    sched
        .go(Box::new(move || {
            *s.lock() = Some(f());
            d.store(1, Ordering::Release);
            IMAGE.futexwakeup(&d, 1);
        }))
        .expect("spawn the scenario goroutine");
    for _ in 0..secs * 10 {
        if done.load(Ordering::Acquire) == 1 {
            return slot.lock().take();
        }
        IMAGE.futexsleep(&done, 0, Some(100_000_000));
    }
    // Timed out: what the scheduler looks like, for the report.
    say!(
        "  timed out after {secs} s: {}",
        schedtrace(&sched.stats(), 0)
    );
    None
}

/// Parks the current G until `left` drops to zero (the last decrement
/// unparks it).
fn wait_zero(left: &AtomicUsize) {
    while left.load(Ordering::Acquire) != 0 {
        // SAFETY: on a goroutine; the parker is its own.
        unsafe { Parker::current().park() };
    }
}

const SPAWNERS: usize = 100;
const CHILDREN: usize = 1000;
const TOTAL: usize = SPAWNERS * CHILDREN;

fn spawn_100k(sched: &'static Sched) -> (usize, usize) {
    let seen: Arc<Vec<AtomicU8>> = Arc::new((0..TOTAL).map(|_| AtomicU8::new(0)).collect());
    let s2 = seen.clone();
    let r = run_g(sched, 60, move || {
        // SAFETY: on a goroutine.
        let main = unsafe { Parker::current() };
        let left = Arc::new(AtomicUsize::new(SPAWNERS));
        for s in 0..SPAWNERS {
            let (seen, left, main) = (s2.clone(), left.clone(), main.clone());
            sched
                .go(Box::new(move || {
                    // SAFETY: on a goroutine.
                    let me = unsafe { Parker::current() };
                    let kids = Arc::new(AtomicUsize::new(CHILDREN));
                    for i in 0..CHILDREN {
                        let (seen, kids, me) = (seen.clone(), kids.clone(), me.clone());
                        sched
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
        return (0, TOTAL);
    }
    let once = seen
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) == 1)
        .count();
    (once, TOTAL - once)
}

fn gosched_progress(sched: &'static Sched) -> Option<u64> {
    run_g(sched, 20, move || {
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        sched
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

fn park_pingpong(sched: &'static Sched) -> Option<(u64, u64)> {
    run_g(sched, 20, move || {
        // SAFETY: on a goroutine.
        let main = unsafe { Parker::current() };
        let peer_count = Arc::new(AtomicU64::new(0));
        let peer_slot: Arc<spin::Mutex<Option<Arc<Parker>>>> = Arc::new(spin::Mutex::new(None));
        let (pc, ps, m2) = (peer_count.clone(), peer_slot.clone(), main.clone());
        sched
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
fn parallel_and_stolen(sched: &'static Sched) -> Option<bool> {
    run_g(sched, 20, move || {
        let x = Arc::new(AtomicU32::new(0));
        let left = Arc::new(AtomicUsize::new(2));
        // SAFETY: on a goroutine.
        let main = unsafe { Parker::current() };
        let ok = Arc::new(AtomicBool::new(true));
        for p in 0..2u32 {
            let (x, left, main, ok) = (x.clone(), left.clone(), main.clone(), ok.clone());
            sched
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

/// Goroutines sleep for [`SLEEPS_MS`] on the 2 Ms; returns, in wake-up
/// order, each one's duration and whether it woke no earlier than its
/// deadline.
fn sleep_order(sched: &'static Sched) -> Option<Vec<(u64, bool)>> {
    run_g(sched, 20, move || {
        // SAFETY: on a goroutine.
        let main = unsafe { Parker::current() };
        let left = Arc::new(AtomicUsize::new(SLEEPS_MS.len()));
        let order: Arc<spin::Mutex<Vec<(u64, bool)>>> = Arc::new(spin::Mutex::new(Vec::new()));
        for ms in SLEEPS_MS {
            let (left, main, order) = (left.clone(), main.clone(), order.clone());
            sched
                .go(Box::new(move || {
                    let deadline = IMAGE.nanotime() + ms * 1_000_000;
                    gokernel::sleep(Duration::from_millis(ms));
                    let on_time = IMAGE.nanotime() >= deadline;
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
fn locked_g(sched: &'static Sched) -> Option<(bool, usize)> {
    run_g(sched, 60, move || {
        lock_os_thread();
        let (m, tp) = (m_id(), fs0());
        let mut same = true;
        for _ in 0..1000 {
            gosched();
            same &= m_id() == m && fs0() == tp;
            // SAFETY: on a goroutine.
            let me = unsafe { Parker::current() };
            let waker = me.clone();
            sched
                .go(Box::new(move || waker.unpark()))
                .expect("spawn the waker");
            // SAFETY: our own parker.
            unsafe { me.park() };
            same &= m_id() == m && fs0() == tp;
        }
        let locked = sched.stats().locked_ms;
        unlock_os_thread();
        (same, locked)
    })
}

/// Polls `sched.stats()` (up to 10 s) until nothing runs: every P idle,
/// no live goroutine.
fn quiescent_stats(sched: &Sched) -> Stats {
    let zero = AtomicU32::new(0);
    for _ in 0..10_000 {
        let s = sched.stats();
        if s.idle_ps == s.procs && s.goroutines.live() == 0 {
            return s;
        }
        IMAGE.futexsleep(&zero, 0, Some(1_000_000));
    }
    sched.stats()
}

/// The PT_TLS program header, read through AT_PHDR / AT_PHNUM.
/// Channels, select and the sync types on 2 Ms: 4 producers send 10,000
/// numbers each over an unbuffered channel to 4 consumers that add them up
/// under a `Mutex`; a `WaitGroup` tells when they are done; a select
/// drains two buffered channels. Returns (sum, expected, selected).
fn chan_select_sync(sched: &'static Sched) -> Option<(u64, u64, usize)> {
    use gokernel::sync::{Mutex, WaitGroup};
    const PER: u64 = 10_000;
    run_g(sched, 30, move || {
        let c = gokernel::chan::<u64>(0);
        let total = Arc::new(Mutex::new(0u64));
        let wg = Arc::new(WaitGroup::new());
        for _ in 0..4 {
            wg.add(1);
            let (c, total, wg) = (c.clone(), total.clone(), wg.clone());
            sched
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
            sched
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

fn pt_tls(boot: &Boot) -> Option<(usize, usize, usize, usize)> {
    const PT_TLS: u32 = 7;
    const PHDR_SIZE: usize = 56;
    (0..boot.phnum).find_map(|i| {
        let ph = boot.phdr + i * PHDR_SIZE;
        // SAFETY: the kernel maps the program headers at AT_PHDR, AT_PHNUM
        // entries of 56 bytes (Elf64_Phdr).
        unsafe {
            let p_type = *(ph as *const u32);
            (p_type == PT_TLS).then(|| {
                let vaddr = *((ph + 16) as *const usize);
                let filesz = *((ph + 32) as *const usize);
                let memsz = *((ph + 40) as *const usize);
                let align = *((ph + 48) as *const usize);
                (vaddr, filesz, memsz, align)
            })
        }
    })
}

pub fn run(boot: &Boot, mode: FsBaseMode, tp: usize, cpu_mode: bool) -> bool {
    let mut r = Report {
        passed: 0,
        failed: 0,
    };
    say!(
        "gokernel freestanding image: FS base by {mode:?}, AT_HWCAP2 = {:#x}, Ms: {}",
        boot.hwcap2,
        if cpu_mode {
            "2 CPUs that join (the platform starts no threads), interrupts by signals"
        } else {
            "clone(2) threads"
        }
    );

    let t = crate::tls_template();
    let ph = pt_tls(boot);
    r.check(
        "tls-template",
        ph == Some((t.tdata as usize, t.filesz, t.memsz, t.align)),
        format_args!(
            "linker symbols ({:#x}, filesz {}, memsz {}, align {}) vs PT_TLS {ph:x?}",
            t.tdata as usize, t.filesz, t.memsz, t.align
        ),
    );

    let base = sys::arch_get_fs();
    let via_insn = if mode == FsBaseMode::Wrfsbase {
        // SAFETY: wrfsbase mode was allowed by AT_HWCAP2, so rdfsbase is too.
        Some(unsafe { gokernel::tls::rdfsbase() })
    } else {
        None
    };
    r.check(
        "fs0-is-fs-base",
        fs0() == tp && base == tp && via_insn.is_none_or(|v| v == tp),
        format_args!(
            "fs:0 = {:#x}, FS base = {base:#x}, rdfsbase = {via_insn:x?}, tp = {tp:#x}",
            fs0()
        ),
    );

    let sched: &'static Sched = Sched::leak(Sched::new(2, gokernel::stack::STACK_MIN, &IMAGE));
    if cpu_mode {
        let started = cpus::start(sched) && cpus::storm_start();
        r.check(
            "cpus-join",
            started,
            format_args!(
                "{} CPU threads started, each calling gokernel::cpu::join; a storm thread sends them SIGUSR1 every 20-220 us",
                cpus::NCPUS
            ),
        );
        if !started {
            say!("image: {} passed, {} failed", r.passed, r.failed);
            return true;
        }
    }

    let (once, bad) = spawn_100k(sched);
    r.check(
        "spawn-100000",
        once == TOTAL,
        format_args!("{once} of {TOTAL} goroutines ran exactly once ({bad} did not), spawned from 100 goroutines"),
    );
    let spins = gosched_progress(sched);
    r.check(
        "gosched-progress",
        spins.is_some_and(|s| s < 10_000_000),
        format_args!("the spinning goroutine saw the flag after {spins:?} gosched calls"),
    );
    let pp = park_pingpong(sched);
    r.check(
        "park-unpark-pingpong",
        pp == Some((ROUNDS, ROUNDS)),
        format_args!("{pp:?} hand-offs each way, {ROUNDS} expected"),
    );
    let par = parallel_and_stolen(sched);
    let stats = sched.pstats();
    let stolen: u64 = stats.iter().map(|p| p.stolen).sum();
    r.check(
        "parallel-and-stolen",
        par == Some(true) && stolen > 0,
        format_args!("two goroutines ran at once: {par:?}; Gs stolen between Ps: {stolen}"),
    );
    let locked = locked_g(sched);
    r.check(
        "lock-os-thread",
        locked == Some((true, 1)),
        format_args!(
            "(same M and TLS block across 1,000 goscheds and parks, locked Ms) = {locked:?}"
        ),
    );
    if cpu_mode {
        let (sent, handled, runs, caught_up) = cpus::storm_stop();
        r.check(
            "intr-storm",
            caught_up && handled > 0 && runs > 0,
            format_args!(
                "{sent} signals sent to the CPUs during the checks above, {handled} handled (each posting an IrqWork from the handler), {runs} runs; the last post ran: {caught_up}"
            ),
        );
        check_cpus(&mut r, sched);
    }
    let s = quiescent_stats(sched);
    let queued = s.runqueue + s.ps.iter().map(|p| p.runq_len).sum::<usize>();
    r.check(
        "stats",
        s.idle_ps == 2 && s.goroutines.live() == 0 && queued == 0 && s.locked_ms == 0,
        format_args!("{}", schedtrace(&s, 0)),
    );

    let css = chan_select_sync(sched);
    r.check(
        "chan-select-sync",
        css.is_some_and(|(sum, expected, selected)| sum == expected && selected == 16),
        format_args!(
            "(sum, expected, values drained by select) = {css:?}, over an unbuffered channel, a Mutex and a WaitGroup"
        ),
    );

    let order = sleep_order(sched);
    let mut sorted = SLEEPS_MS;
    sorted.sort_unstable();
    r.check(
        "sleep-order",
        order.as_ref().is_some_and(|o| {
            o.iter().map(|w| w.0).eq(sorted.iter().copied()) && o.iter().all(|w| w.1)
        }),
        format_args!(
            "goroutines sleeping {SLEEPS_MS:?} ms woke as (ms, not before the deadline) {order:?}"
        ),
    );

    let n = NRECORDS.load(Ordering::Acquire).min(M_RECORDS.len());
    let recs: Vec<_> = M_RECORDS[..n]
        .iter()
        .map(|m| {
            (
                m.tp.load(Ordering::Relaxed),
                m.fs0.load(Ordering::Relaxed),
                m.fs_base.load(Ordering::Relaxed),
                m.slot.load(Ordering::Relaxed),
            )
        })
        .collect();
    let consistent = recs.iter().all(|&(tp, f0, fb, _)| tp == f0 && tp == fb);
    let mut slots: Vec<usize> = recs.iter().map(|r| r.3).collect();
    slots.sort_unstable();
    slots.dedup();
    r.check(
        "tls-per-m",
        n >= 3 && consistent && slots.len() == n,
        format_args!(
            "{n} threads (M0 + {} Ms): fs:0 == FS base on each: {consistent}; distinct G slots: {}",
            n - 1,
            slots.len()
        ),
    );

    sched.shutdown();
    r.check(
        "shutdown",
        sched.ngoroutines() == 0,
        format_args!("Ms stopped; goroutines left: {}", sched.ngoroutines()),
    );
    if cpu_mode {
        let left = cpus::wait_cpus_left();
        r.check(
            "cpus-leave",
            left == cpus::NCPUS as u32 && sched.joined_cpus() == 0,
            format_args!(
                "cpu::join returned on {left} of {} CPUs after shutdown",
                cpus::NCPUS
            ),
        );
    }

    for p in &stats {
        say!(
            "  P{}: spawned {}, stolen {}, parked {}, scheduled {}, run-queue high-water {}",
            p.id,
            p.spawned,
            p.stolen,
            p.parked,
            p.scheduled,
            p.runq_hwm
        );
    }
    say!("image: {} passed, {} failed", r.passed, r.failed);
    r.failed != 0
}

/// The checks of CPU mode, after the scenarios.
fn check_cpus(r: &mut Report, sched: &'static Sched) {
    for busy in [true, false] {
        let (woke, asleep) = cpus::ready_from_interrupt(sched, busy);
        let n = cpus::IRQ_ROUNDS;
        if busy {
            r.check(
                "intr-ready-while-busy",
                woke == n,
                format_args!(
                    "a goroutine waiting on an IrqEvent woke {woke} of {n} times, each by a SIGUSR2 handler on a CPU while both CPUs ran yielding goroutines"
                ),
            );
        } else {
            r.check(
                "intr-ready-while-idle",
                woke == n && asleep == n,
                format_args!(
                    "woke {woke} of {n} times; both CPUs idle (every P idle, both threads asleep in the kernel) before {asleep} of the signals"
                ),
            );
        }
    }
    let locked = cpus::locked_on_cpu(sched);
    r.check(
        "lock-os-thread-cpus",
        locked.is_some_and(|(same, most)| same && most <= cpus::NCPUS),
        format_args!(
            "(same CPU and TLS block across 200 parks woken from the other CPU, most Ms seen) = {locked:?}"
        ),
    );
    let gl = cpus::go_locked_cpus(sched);
    r.check(
        "go-locked-cpus",
        gl.is_some_and(|(first, elsewhere, second)| {
            first && elsewhere && second == Err(gokernel::cpu::GoLockedError::NoFreeCpu)
        }),
        format_args!(
            "(try_go_locked took the idle CPU, the goroutine ran locked on the other M, a second try_go_locked with no free CPU) = {gl:?}"
        ),
    );
    let (state, ticks, sleeps, got) = cpus::plain_thread_sleeps(sched);
    r.check(
        "plain-thread-sleeps",
        state == b'S' && ticks <= 2 && sleeps >= 1 && got == 7,
        format_args!(
            "a thread that is not an M, blocked on a channel: state {:?}, {ticks} clock ticks of CPU in 300 ms, {sleeps} futexsleep calls; then received {got}",
            state as char
        ),
    );
    let threads = sched.stats().threads;
    let calls = NEWOSPROC_CALLS.load(Ordering::Relaxed);
    r.check(
        "ms-are-cpus",
        calls == 0 && threads == cpus::NCPUS,
        format_args!(
            "newosproc called {calls} times; Ms = {threads} (the {} CPUs that joined)",
            cpus::NCPUS
        ),
    );
}
