//! Stack allocation failure (injected): `try_spawn` returns an error,
//! nothing leaks and the runtime stays usable. (`spawn` allocates at the
//! goroutine's first run, where a failure is fatal: tests/lazystack.rs.)
//!
//! Alone in its test binary: failure injection is process-wide.

use std::sync::Arc;

use gokernel::stack::{StackError, inject_stack_alloc_failures};
use gokernel::{Runtime, SpawnError};

const STACK: usize = 64 * 1024;

#[test]
fn a_failed_stack_allocation_is_an_error_and_leaks_nothing() {
    let rt = Runtime::builder()
        .procs(2)
        .stack_size(STACK)
        .build()
        .unwrap();
    // From outside the runtime.
    let captured = Arc::new(());
    let c2 = captured.clone();
    inject_stack_alloc_failures(1);
    let e = rt
        .try_spawn(move || drop(c2))
        .err()
        .expect("the injected failure");
    assert_eq!(e, SpawnError(StackError::OutOfMemory { size: STACK }));
    assert_eq!(
        e.to_string(),
        "cannot start a goroutine: out of memory allocating a 65536-byte stack"
    );
    assert_eq!(
        Arc::strong_count(&captured),
        1,
        "the closure was not dropped"
    );
    assert_eq!(rt.num_goroutine(), 0);

    // From inside: try_spawn errs; the goroutine that tried goes on, and
    // so does the runtime.
    let c3 = captured.clone();
    let (err, after) = rt
        .block_on(move || {
            inject_stack_alloc_failures(1);
            let err = gokernel::try_spawn(move || drop(c3)).err();
            let after = gokernel::spawn(|| 7).join().unwrap();
            (err, after)
        })
        .unwrap();
    assert_eq!(
        err,
        Some(SpawnError(StackError::OutOfMemory { size: STACK }))
    );
    assert_eq!(after, 7);
    assert_eq!(Arc::strong_count(&captured), 1, "a closure leaked");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while rt.num_goroutine() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "goroutines left behind"
        );
        std::thread::yield_now();
    }
}
