//! The image's run: the checks only a freestanding image can make (TLS
//! template, FS base, per-M slots, shutdown) around the scheduler
//! scenarios it shares with the reference kernel (`scenarios.rs`), on 2
//! Ms made by clone(2) (or, with `--cpus`, on 2 CPUs that joined, under a
//! storm of simulated interrupts, with the CPU-mode checks: see
//! `cpus.rs`).

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use gokernel::runtime2::Sched;
use gokernel::tls::{FsBaseMode, fs0};

use crate::platform::{IMAGE, M_RECORDS, NEWOSPROC_CALLS, NRECORDS};
use crate::scenarios::{self, Host, Report};
use crate::{Boot, cpus, say, sys};

/// How many times the scenarios' time limits the image allows. The limits
/// only catch hangs, and a loaded host stretches the scenarios far past
/// them: goroutines bound to two Ms hand a token back and forth with a
/// thread wake-up each time, and at a load average of 15 on 2 CPUs each
/// such wake-up waited about 2 ms for a CPU, so `park-unpark-pingpong`'s
/// 10,000 hand-offs each way took more than its 20 s (seen in the gate
/// while other builds ran; the Ms were runnable, not stuck).
const IMAGE_PATIENCE: u32 = 6;

/// The sleep-order scenario's durations × this (gaps of 40 ms). Sleepers
/// whose timers fire in one check run on different CPUs at once, and
/// then record their wake-ups in either order: with gaps of 10 ms, a
/// timer thread that the host scheduled more than 10 ms late (the `cpus`
/// run, beside its signal storm) failed the check 3 runs in 40 and 1 in
/// 60 at the commit this session started from.
const IMAGE_SLEEP_SCALE: u64 = 4;

/// [`scenarios::run_g`] on the image's platform (for `cpus.rs`).
pub(crate) fn run_g<T: Send + 'static>(
    sched: &'static Sched,
    secs: u32,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    scenarios::run_g(
        Host {
            sched,
            platform: &IMAGE,
            patience: IMAGE_PATIENCE,
        },
        secs,
        f,
    )
}

/// The PT_TLS program header, read through AT_PHDR / AT_PHNUM.
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
    let mut r = Report::new();
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

    scenarios::run_all(
        Host {
            sched,
            platform: &IMAGE,
            patience: IMAGE_PATIENCE,
        },
        &mut r,
        100,
        IMAGE_SLEEP_SCALE,
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

    for p in &sched.pstats() {
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
    check_poll(r, sched);
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

/// The interrupt-driven poller (`poll.rs`), in CPU mode.
fn check_poll(r: &mut Report, sched: &'static Sched) {
    let poller = crate::poll::start(sched);
    r.check(
        "netpoll-irq-install",
        poller.is_some(),
        format_args!(
            "SIGURG handler and netpoll_irq::install: {}",
            poller.is_some()
        ),
    );
    let Some(poller) = poller else { return };
    let n = crate::poll::ROUNDS;
    let (woke, _) = crate::poll::wakes(sched, poller, true);
    r.check(
        "netpoll-irq-while-busy",
        woke == n,
        format_args!(
            "a goroutine waiting on an IrqSource through the poller woke {woke} of {n} times, each by a SIGURG handler on a CPU while both CPUs ran yielding goroutines"
        ),
    );
    let (woke, idle) = crate::poll::wakes(sched, poller, false);
    r.check(
        "netpoll-irq-while-idle",
        woke == n && idle == n,
        format_args!(
            "woke {woke} of {n} times; before {idle} of the signals both CPU threads were asleep in the kernel, one M blocked in the poller"
        ),
    );
    let (res, ms, idle) = crate::poll::deadline(sched, poller);
    r.check(
        "netpoll-irq-deadline",
        res == Err(gokernel::netpoll::WaitError::Timeout)
            && ms >= crate::poll::DEADLINE_MS
            && idle,
        format_args!(
            "a {} ms wait nothing signals: {res:?} after {ms} ms; during it, both CPUs seen asleep with one M in the poller: {idle}",
            crate::poll::DEADLINE_MS
        ),
    );
}
