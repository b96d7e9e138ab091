//! Stacks made by `malg` are freed when their G is dropped.
//!
//! Alone in its test binary: it reads this process's memory counters, which
//! other tests running in parallel threads would disturb.

mod common;

use common::{mappings, run_in_g, status_kb};
use gokernel::proc::malg;
use gokernel::stack::{STACK_MIN, StackError, check_stack_size};

#[test]
fn malg_stacks_are_freed_on_drop_over_100_000_cycles() {
    const SIZE: usize = 64 * 1024;
    const SLACK_KB: u64 = 256 * 1024;
    // Warm up allocator and std state, then take the baseline.
    for _ in 0..100 {
        drop(malg(SIZE).unwrap());
    }
    let (vm0, maps0) = (status_kb("VmSize:"), mappings());
    for i in 0..100_000u32 {
        let g = malg(SIZE).unwrap();
        // Touch the top and bottom pages so the stack is really committed.
        // SAFETY: [lo, hi) is the G's own, unused stack.
        unsafe {
            ((g.stack().hi() - 8) as *mut u64).write_volatile(u64::from(i));
            (g.stack().lo() as *mut u64).write_volatile(u64::from(i));
        }
        drop(g);
    }
    let (vm1, maps1) = (status_kb("VmSize:"), mappings());
    if std::env::var_os("GOKERNEL_VALGRIND").is_some() {
        return; // Valgrind's own mappings and memory make these numbers meaningless
    }
    // A leak would be 100,000 x 68 KiB = 6.5 GiB of address space. The
    // slack covers a malloc arena (64 MiB) that a test thread running in
    // parallel may reserve meanwhile.
    assert!(
        vm1 <= vm0 + SLACK_KB,
        "VmSize grew from {vm0} kB to {vm1} kB over 100,000 malg/drop cycles"
    );
    assert!(maps1 <= maps0 + 16, "mappings grew from {maps0} to {maps1}");
    // Stacks that ran a G are freed the same way.
    for _ in 0..1000 {
        run_in_g(SIZE, || ());
    }
    let vm2 = status_kb("VmSize:");
    assert!(
        vm2 <= vm0 + SLACK_KB,
        "VmSize grew from {vm0} kB to {vm2} kB running Gs"
    );
}

#[test]
fn malg_rejects_bad_stack_sizes_with_a_typed_error() {
    assert_eq!(malg(4096).err(), Some(StackError::TooSmall { size: 4096 }));
    assert_eq!(
        malg(STACK_MIN + 1).err(),
        Some(StackError::NotPageMultiple {
            size: STACK_MIN + 1
        })
    );
    assert_eq!(
        malg(1 << 40).err(),
        Some(StackError::TooLarge { size: 1 << 40 })
    );
    assert_eq!(check_stack_size(STACK_MIN), Ok(()));
    let msg = StackError::TooSmall { size: 4096 }.to_string();
    assert!(msg.contains("minimum of 32768"), "{msg}");
}

#[test]
fn the_guard_page_sits_just_below_the_stack() {
    let g = malg(STACK_MIN).unwrap();
    let (lo, hi) = (g.stack().lo(), g.stack().hi());
    // EFAULT on a guard page (a guard marker or PROT_NONE), where a
    // plain read would fault.
    let readable = common::readable;
    assert!(
        readable(lo) && readable(hi - 1),
        "the stack is not readable"
    );
    assert!(!readable(lo - 1), "the byte below the stack is not a guard");
    assert!(
        !readable(lo - 4096),
        "the guard is less than a page below the stack"
    );
}
