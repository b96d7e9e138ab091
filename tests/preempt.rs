//! `PreemptGuard` from safe code: nesting on one goroutine, and a guard
//! dropped on another goroutine than the one that made it (which must not
//! touch a G that may be gone).

use std::panic::{AssertUnwindSafe, catch_unwind};

use gokernel::Runtime;
use gokernel::preempt::preempt_disable;

#[test]
fn guards_made_and_dropped_on_one_goroutine_nest() {
    let rt = Runtime::builder().procs(1).build().unwrap();
    rt.block_on(|| {
        let a = preempt_disable();
        let b = preempt_disable();
        drop(b);
        gokernel::gosched();
        drop(a);
    })
    .unwrap();
}

#[test]
fn a_guard_dropped_on_another_goroutine_panics_naming_both() {
    let rt = Runtime::builder().procs(1).build().unwrap();
    let msg = rt
        .block_on(|| {
            let me = gokernel::current().id();
            // Made on the M's g0 (a `systemstack` call), dropped on the
            // goroutine: another G.
            let guard = gokernel::systemstack(preempt_disable);
            let err = catch_unwind(AssertUnwindSafe(move || drop(guard))).unwrap_err();
            let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
            (me, msg)
        })
        .unwrap();
    let (me, msg) = msg;
    assert!(
        msg.contains("a PreemptGuard made on goroutine 0 was dropped on goroutine")
            && msg.ends_with(&format!("goroutine {me}; drop it where it was made")),
        "{msg}"
    );
}
