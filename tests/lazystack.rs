//! A goroutine spawned when no dead G has a stack gets its stack when it
//! first runs (`gokernel::lazystack`): a burst that runs one at a time
//! needs few stacks, a never-started goroutine is an ordinary one in every
//! other way (it runs, panics, is joined, shows in a dump, is freed with
//! its runtime), and a stack that cannot be had at the first run is a
//! fatal error naming the goroutine. `try_spawn` still allocates at once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{assert_aborted_with, in_crash_child, run_crash_child, within};
use gokernel::stack::{guarded_stacks_live, inject_stack_alloc_failures};
use gokernel::{Runtime, RuntimeDropped};

fn rt1() -> Runtime {
    Runtime::builder().procs(1).build().unwrap()
}

/// Other tests of this binary run beside the ones that count stacks
/// (process-wide) and make or free a few of their own: what the count may
/// drift by. The two that make many take turns ([`COUNTING`]).
const OTHERS: usize = 64;

/// Held by the tests that count stacks.
static COUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_burst_of_never_started_goroutines_that_run_one_at_a_time_takes_few_stacks() {
    const N: usize = 10_000;
    let _turn = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let rt = rt1();
    let (before, peak, ran) = rt
        .block_on(|| {
            let before = guarded_stacks_live();
            let peak = Arc::new(AtomicUsize::new(0));
            let ran = Arc::new(AtomicUsize::new(0));
            // On 1 P none runs before the spawner parks in the first join.
            let hs: Vec<_> = (0..N)
                .map(|_| {
                    let (peak, ran) = (peak.clone(), ran.clone());
                    gokernel::spawn(move || {
                        peak.fetch_max(guarded_stacks_live(), Ordering::Relaxed);
                        ran.fetch_add(1, Ordering::Relaxed);
                    })
                })
                .collect();
            assert_eq!(
                ran.load(Ordering::Relaxed),
                0,
                "one ran before the spawner parked"
            );
            let queued = guarded_stacks_live();
            assert!(
                queued <= before + OTHERS,
                "{N} queued goroutines took {} stacks before any ran",
                queued - before
            );
            hs.into_iter().for_each(|h| h.join().unwrap());
            (
                before,
                peak.load(Ordering::Relaxed),
                ran.load(Ordering::Relaxed),
            )
        })
        .unwrap();
    assert_eq!(ran, N);
    assert!(
        peak <= before + OTHERS,
        "{N} goroutines run one at a time had up to {} stacks live",
        peak - before
    );
}

#[test]
fn try_spawn_gives_the_goroutine_its_stack_at_once() {
    const N: usize = 1_000;
    let _turn = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let rt = rt1();
    rt.block_on(|| {
        let before = guarded_stacks_live();
        let hs: Vec<_> = (0..N)
            .map(|i| gokernel::try_spawn(move || i).unwrap())
            .collect();
        let queued = guarded_stacks_live();
        assert!(
            queued + OTHERS >= before + N,
            "{N} goroutines from try_spawn took only {} stacks",
            queued.saturating_sub(before)
        );
        let sum: usize = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(sum, N * (N - 1) / 2);
    })
    .unwrap();
}

#[test]
fn a_goroutine_spawned_before_any_stack_is_free_shows_as_not_started_then_runs_panics_and_is_joined()
 {
    let rt = rt1();
    rt.block_on(|| {
        // The main goroutine is the runtime's only G so far: no dead G
        // has a stack to give, so this one has none until it runs.
        let line = line!() + 1;
        let h = gokernel::spawn(|| -> u32 { panic!("boom from a goroutine that had no stack") });
        // (A dump covers every runtime of the process: other tests' too.)
        let ours = |g: &&gokernel::GoroutineInfo| {
            g.id == h.id()
                && g.created_by
                    .is_some_and(|s| s.file() == file!() && s.line() == line)
        };
        let d = gokernel::dump();
        let g = d
            .goroutines()
            .iter()
            .find(ours)
            .unwrap_or_else(|| panic!("the new goroutine is not in the dump:\n{d}"));
        assert!(!g.started, "{g}");
        let text = g.to_string();
        assert!(text.contains("[runnable, not started]"), "{text}");
        let id = h.id();
        let e = h.join().expect_err("the panic comes back");
        assert_eq!(
            e.downcast_ref::<&str>().copied(),
            Some("boom from a goroutine that had no stack")
        );
        // It ran and ended: no longer in a dump.
        let d = gokernel::dump();
        let gone = |g: &&gokernel::GoroutineInfo| {
            g.id == id
                && g.created_by
                    .is_some_and(|s| s.file() == file!() && s.line() == line)
        };
        assert!(d.goroutines().iter().find(gone).is_none(), "{d}");
    })
    .unwrap();
}

#[test]
fn a_runtime_dropped_with_never_started_goroutines_queued_drops_their_closures_and_frees_them() {
    const N: usize = 1_000;
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let r = rt1();
    // Hold the only P with a goroutine that spins until the drop has
    // begun (its M then exits instead of running the queue), so the rest
    // stay queued.
    let spinner = common::spin_the_only_p_until_shutdown(&r);
    let dropped = Arc::new(AtomicUsize::new(0));
    let ran = Arc::new(AtomicUsize::new(0));
    let hs: Vec<_> = (0..N)
        .map(|_| {
            let (c, ran) = (Counted(dropped.clone()), ran.clone());
            r.spawn(move || {
                let _c = c;
                ran.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    assert_eq!(r.num_allocated_gs(), N + 1, "one G each, reused or new");
    within(60, "dropping the runtime", move || drop(r));
    assert!(spinner.join().is_ok());
    for h in hs {
        let e = h.join().expect_err("never started");
        assert!(e.downcast_ref::<RuntimeDropped>().is_some());
    }
    // The last M frees the scheduler, and the Gs, as it ends.
    let deadline = Instant::now() + Duration::from_secs(20);
    while dropped.load(Ordering::SeqCst) < N {
        assert!(
            Instant::now() < deadline,
            "closures of never-started goroutines not dropped"
        );
        std::thread::yield_now();
    }
    assert_eq!(ran.load(Ordering::SeqCst), 0, "a queued goroutine ran");
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        N,
        "each closure dropped once"
    );
}

#[test]
fn a_goroutine_that_cannot_get_a_stack_at_its_first_run_is_a_fatal_error_naming_it() {
    if in_crash_child() {
        let rt = rt1();
        rt.block_on(|| {
            // The main goroutine has its stack; the next allocation fails.
            inject_stack_alloc_failures(1);
            println!("site line {}", line!() + 1);
            let h = gokernel::spawn(|| 1);
            println!("goroutine {}", h.id());
            let _ = h.join();
        })
        .unwrap();
        unreachable!("the goroutine ran without a stack");
    }
    let c = run_crash_child(
        "a_goroutine_that_cannot_get_a_stack_at_its_first_run_is_a_fatal_error_naming_it",
    );
    let field = |key: &str| -> String {
        c.stdout
            .lines()
            .find_map(|l| l.split_once(key).map(|(_, v)| v))
            .unwrap_or_else(|| panic!("no {key:?} in the child's stdout:\n{}", c.stdout))
            .trim()
            .to_string()
    };
    let (line, id) = (field("site line "), field("goroutine "));
    let msg = format!(
        "fatal error: cannot start goroutine {id} (created at {}:{line}:",
        file!()
    );
    assert_aborted_with(
        &c,
        &[
            &msg,
            "): no stack for its first run: out of memory allocating a",
            &format!("(goroutine {id} on m "),
        ],
    );
}
