//! Panics in goroutines: `spawn` hands them to `join`; a `go` goroutine's
//! panic ends the process naming the goroutine, like Go, unless the runtime
//! reports them instead. Process-ending cases run in a child process.

mod common;

use common::{assert_aborted_with, in_crash_child, run_child_ok_with_env, run_crash_child};
use gokernel::Runtime;

#[test]
fn a_panic_in_a_go_goroutine_ends_the_process_naming_it() {
    if in_crash_child() {
        let rt = Runtime::builder().procs(2).build().unwrap();
        let _ = rt.block_on(|| {
            gokernel::go(|| panic!("boom from go"));
            loop {
                gokernel::gosched();
            }
        });
        unreachable!();
    }
    let c = run_crash_child("a_panic_in_a_go_goroutine_ends_the_process_naming_it");
    assert_aborted_with(
        &c,
        &[
            "boom from go",
            "fatal error: a goroutine panicked",
            "(goroutine ",
        ],
    );
}

#[test]
fn a_runtime_built_to_report_panics_reports_them_and_goes_on() {
    if in_crash_child() {
        let rt = Runtime::builder()
            .procs(2)
            .report_go_panics(true)
            .build()
            .unwrap();
        let n = rt
            .block_on(|| {
                for _ in 0..3 {
                    gokernel::go(|| panic!("reported boom"));
                }
                // Wait until the three have panicked, been reported and
                // ended: only this goroutine is left then.
                while gokernel::num_goroutine() > 1 {
                    gokernel::gosched();
                }
                let h = gokernel::spawn(|| 40 + 2);
                h.join().unwrap()
            })
            .unwrap();
        println!("survived with {n}");
        return;
    }
    let c = run_crash_child("a_runtime_built_to_report_panics_reports_them_and_goes_on");
    assert_eq!(
        c.code,
        Some(0),
        "the child should exit normally; stderr:\n{}",
        c.stderr
    );
    assert!(c.stderr.contains("reported boom"), "{}", c.stderr);
    assert!(
        c.stderr.contains(
            "error: a goroutine panicked (message above); it ended, the runtime goes on (goroutine "
        ),
        "{}",
        c.stderr
    );
    assert!(!c.stderr.contains("fatal error"), "{}", c.stderr);
}

#[test]
fn a_panic_in_a_spawned_goroutine_comes_back_from_join_with_its_payload() {
    let rt = Runtime::builder().procs(2).build().unwrap();
    let payload = rt
        .block_on(|| {
            let h = gokernel::spawn(|| std::panic::panic_any(1234u32));
            *h.join().unwrap_err().downcast::<u32>().unwrap()
        })
        .unwrap();
    assert_eq!(payload, 1234);
}

#[test]
fn a_panic_in_the_main_goroutine_is_resumed_by_block_on() {
    let rt = Runtime::builder().procs(1).build().unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(|| -> u32 { panic!("main boom") })
    }));
    let payload = r.unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"main boom"));
    // The runtime goes on.
    assert_eq!(rt.block_on(|| 5).unwrap(), 5);
}

#[test]
fn a_caught_panic_with_rust_backtrace_fits_in_the_minimum_stack() {
    if in_crash_child() {
        // Printing a panic with a backtrace (std's hook, on the goroutine's
        // stack) is the deepest thing an ordinary caught panic does.
        let rt = Runtime::builder()
            .procs(1)
            .stack_size(gokernel::stack::STACK_MIN)
            .build()
            .unwrap();
        let r = rt.block_on(|| {
            gokernel::spawn(|| panic!("caught on the smallest stack"))
                .join()
                .is_err()
        });
        assert_eq!(r, Ok(true));
        return;
    }
    for bt in ["1", "full"] {
        let c = run_child_ok_with_env(
            "a_caught_panic_with_rust_backtrace_fits_in_the_minimum_stack",
            &[("RUST_BACKTRACE", bt)],
        );
        assert!(
            c.stderr.contains("caught on the smallest stack"),
            "RUST_BACKTRACE={bt}: stderr:\n{}",
            c.stderr
        );
    }
}
