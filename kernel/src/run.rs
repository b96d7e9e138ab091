//! The scenarios the kernel runs: the image's scheduler scenarios
//! (`scenarios.rs`) and the interrupt-driven ones, then a summary line
//! and the exit status through isa-debug-exit.

use gokernel::runtime2::Sched;

use crate::scenarios::{self, Host, Report};
use crate::{ALLOC, say, x86};

/// Spawners in the spawn scenario (× 1,000 goroutines each).
const SPAWNERS: usize = 10;

/// Runs every scenario and ends the machine.
pub fn main(sched: &'static Sched) -> ! {
    let h = Host {
        sched,
        platform: &crate::glue::PLATFORM,
    };
    let mut r = Report::new();
    scenarios::run_all(h, &mut r, SPAWNERS);
    let (in_use, peak, left) = ALLOC.usage();
    say!(
        "heap: {} KiB in use, {} KiB at most, {} MiB never used",
        in_use >> 10,
        peak >> 10,
        left >> 20
    );
    say!("kernel: {} passed, {} failed", r.passed, r.failed);
    x86::exit_qemu(if r.failed == 0 {
        x86::EXIT_PASS
    } else {
        x86::EXIT_FAIL
    })
}
