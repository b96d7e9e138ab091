//! The scenarios the kernel runs, as its first goroutine: what 10,000
//! parked goroutines cost in heap, the image's scheduler scenarios
//! (`scenarios.rs`), the interrupt-driven ones (`irq.rs`), then the g0
//! stack depths, a summary line and the exit status through
//! isa-debug-exit.

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicUsize, Ordering};

use gokernel::proc::Parker;
use gokernel::runtime2::Sched;

use crate::scenarios::{self, Host, Report, run_g};
use crate::{ALLOC, say, smp, x86};

/// Spawners in the spawn scenario (× 1,000 goroutines each).
const SPAWNERS: usize = 10;

/// The sleep-order scenario's durations × this (gaps of 100 ms): an
/// emulated CPU on a loaded host may be scheduled tens of milliseconds
/// late (with 4 CPUs on 2 loaded host cores, 40 ms gaps failed 1 boot in
/// 30).
const SLEEP_SCALE: u64 = 10;

/// The scenarios' time limits × this (see `Host::patience`): TCG's
/// vCPUs are host threads, on a host shared with other work.
const PATIENCE: u32 = 3;

/// Goroutines alive at once in the heap-cost scenario.
const PARKED: usize = 10_000;

/// Heap bytes one parked goroutine may cost: its `STACK_MIN` stack, the
/// soft-guard page, its G, closure and channel waiter, with room.
const PARKED_BUDGET: usize = gokernel::stack::STACK_MIN + 8 * 1024;

/// Runs every scenario and ends the machine.
pub fn main(sched: &'static Sched) -> ! {
    let h = Host {
        sched,
        platform: &crate::glue::PLATFORM,
        patience: PATIENCE,
    };
    let mut r = Report::new();
    // First, while no dead G (with its stack) waits for reuse: each of
    // these goroutines then costs its full allocation.
    let cost = parked_cost(h);
    r.check(
        "heap-10000-parked",
        cost.is_some_and(|c| c <= PARKED_BUDGET),
        format_args!(
            "{PARKED} goroutines parked on a channel cost {:?} heap bytes each (STACK_MIN = {}; budget {PARKED_BUDGET})",
            cost,
            gokernel::stack::STACK_MIN
        ),
    );

    scenarios::run_all(h, &mut r, SPAWNERS, SLEEP_SCALE);
    crate::irq::run_all(h, &mut r);
    crate::poll_scenarios::run_all(h, &mut r);
    crate::preempt_scenarios::run_all(h, &mut r);

    let (in_use, peak, left) = ALLOC.usage();
    say!(
        "heap: {} KiB in use, {} KiB at most, {} MiB never used",
        in_use >> 10,
        peak >> 10,
        left >> 20
    );
    let g0 = smp::g0_stack_use();
    say!(
        "g0 stacks used (KiB, by CPU; {} KiB each): {:?}",
        crate::boot::BOOT_STACK >> 10,
        g0.iter()
            .map(|b| b.div_ceil(1024))
            .collect::<alloc::vec::Vec<_>>()
    );
    say!("kernel: {} passed, {} failed", r.passed, r.failed);
    x86::exit_qemu(if r.failed == 0 {
        x86::EXIT_PASS
    } else {
        x86::EXIT_FAIL
    })
}

/// Starts [`PARKED`] goroutines that all block on one channel, measures
/// the heap they hold, then lets them finish; returns bytes per goroutine.
fn parked_cost(h: Host) -> Option<usize> {
    run_g(h, 120, move || {
        let gate = gokernel::chan::<()>(0);
        let started = Arc::new(AtomicUsize::new(0));
        // SAFETY: on a goroutine.
        let me = unsafe { Parker::current() };
        let before = ALLOC.usage().0;
        for _ in 0..PARKED {
            let (g, s, m) = (gate.clone(), started.clone(), me.clone());
            h.sched
                .go(Box::new(move || {
                    if s.fetch_add(1, Ordering::SeqCst) + 1 == PARKED {
                        m.unpark();
                    }
                    let _ = g.recv(); // until the channel is closed
                    s.fetch_sub(1, Ordering::SeqCst);
                }))
                .expect("spawn a parked goroutine");
        }
        while started.load(Ordering::SeqCst) < PARKED {
            // SAFETY: our own parker.
            unsafe { me.park() };
        }
        // Let the last ones reach the receive.
        gokernel::sleep(core::time::Duration::from_millis(20));
        let held = ALLOC.usage().0 - before;
        gate.close().unwrap();
        while started.load(Ordering::SeqCst) > 0 {
            gokernel::sleep(core::time::Duration::from_millis(1));
        }
        held / PARKED
    })
}
