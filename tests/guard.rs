//! Every stack the safe API makes has a hardware guard page (a guard
//! marker in a chunk of stacks where the kernel has them, else a
//! `PROT_NONE` mapping of its own); with `mprotect` guards the number of
//! such stacks is bounded by the process's mapping limit; running out of
//! it, or of a lowered budget, is a named error; unguarded stacks are an
//! `unsafe` opt-in.
//!
//! The guarded-stack budget is process-wide and these tests count this
//! process's mappings, so each runs its body in a child process of its
//! own.

mod common;

use common::{
    in_crash_child, mapping_table, mappings, readable, run_child_ok, run_child_ok_with_env,
};
use gokernel::stack::{
    self, CHUNK_SLOTS, MAPPINGS_PER_GUARDED_STACK, PAGE_SIZE, STACK_MIN, StackError, chunk_slots,
    guard_markers, guard_page_budget, guarded_stack_limit, guarded_stacks_live,
    set_guard_page_budget,
};
use gokernel::{Runtime, SpawnError};

const STACK: usize = 64 * 1024;

/// Asserts that each stack's guard page (the page below `lo`) faults on
/// access while the stack's own lowest and highest pages do not.
fn assert_guarded(gs: &[Box<gokernel::runtime2::G>]) {
    for g in gs {
        let (lo, hi) = (g.stack().lo(), g.stack().hi());
        assert!(
            !readable(lo - PAGE_SIZE) && !readable(lo - 1),
            "the page below [{lo:#x}, {hi:#x}) is not a guard page"
        );
        assert!(
            readable(lo) && readable(hi - 1),
            "[{lo:#x}, {hi:#x}) is not readable"
        );
    }
}

#[test]
fn with_guard_markers_a_chunk_of_stacks_is_one_mapping_and_each_has_a_guard_page() {
    if in_crash_child() {
        assert!(
            guard_markers(),
            "this kernel has guard markers (Linux 6.13+)"
        );
        const N: usize = 1000;
        let mut gs = Vec::with_capacity(N);
        let before = mappings();
        for _ in 0..N {
            gs.push(gokernel::proc::malg(STACK_MIN).unwrap());
        }
        let added = mappings() - before;
        assert_eq!(chunk_slots(STACK_MIN), CHUNK_SLOTS);
        assert!(
            added <= N.div_ceil(CHUNK_SLOTS) + 8,
            "{N} guarded stacks added {added} mappings"
        );
        assert_guarded(&gs);
        // A freed stack's slot is reused, its guard still there.
        let freed = gs.pop().unwrap().stack().lo();
        let again = gokernel::proc::malg(STACK_MIN).unwrap();
        assert_eq!(again.stack().lo(), freed, "the freed slot was not reused");
        assert_guarded(&[again]);
        return;
    }
    let markers = {
        let v = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut it = v
            .trim()
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (6, 13)
    };
    if !markers {
        eprintln!("Linux before 6.13: no guard markers; the mprotect test covers the guards");
        return;
    }
    run_child_ok("with_guard_markers_a_chunk_of_stacks_is_one_mapping_and_each_has_a_guard_page");
}

#[test]
fn with_mprotect_guards_each_guarded_stack_is_two_mappings_a_prot_none_page_and_the_stack() {
    if in_crash_child() {
        assert!(
            !guard_markers(),
            "GOKERNEL_STACK_GUARDS=mprotect was ignored"
        );
        const N: usize = 1000;
        let mut gs = Vec::with_capacity(N);
        let before = mappings();
        for _ in 0..N {
            gs.push(gokernel::proc::malg(STACK_MIN).unwrap());
        }
        let after = mappings();
        // Exactly two per stack, as documented; a few more may come from
        // the allocator meanwhile.
        assert_eq!(MAPPINGS_PER_GUARDED_STACK, 2);
        assert!(
            (N * MAPPINGS_PER_GUARDED_STACK..N * MAPPINGS_PER_GUARDED_STACK + 8)
                .contains(&(after - before)),
            "{N} guarded stacks added {} mappings",
            after - before
        );
        // And each stack is exactly that: a PROT_NONE page just below it,
        // the stack itself one read-write mapping, neither merged with a
        // neighbour.
        let table = mapping_table();
        for g in &gs {
            let (lo, hi) = (g.stack().lo(), g.stack().hi());
            assert_eq!(
                table.get(&(lo - PAGE_SIZE)),
                Some(&(lo, "---p".to_string())),
                "no PROT_NONE page of its own below [{lo:#x}, {hi:#x})"
            );
            assert_eq!(
                table.get(&lo),
                Some(&(hi, "rw-p".to_string())),
                "[{lo:#x}, {hi:#x}) is not one mapping of its own"
            );
        }
        assert_guarded(&gs);
        return;
    }
    run_child_ok_with_env(
        "with_mprotect_guards_each_guarded_stack_is_two_mappings_a_prot_none_page_and_the_stack",
        &[("GOKERNEL_STACK_GUARDS", "mprotect")],
    );
}

#[test]
fn the_limit_follows_vm_max_map_count_less_the_reserve() {
    assert_eq!(guarded_stack_limit(65_530), 28_669);
    assert_eq!(guarded_stack_limit(2_200_000), 1_095_904);
    assert_eq!(guarded_stack_limit(100), 0);
    let mmc: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Another test binary may raise the sysctl meanwhile (tests/million.rs
    // does, as root); the runtime's view is never above the sysctl.
    assert!(stack::max_map_count() <= mmc);
    if guard_markers() {
        // No mapping per stack: no limit but a budget, and none is set.
        assert_eq!(guard_page_budget(), usize::MAX);
    } else {
        assert!(guard_page_budget() <= guarded_stack_limit(mmc));
    }
}

#[test]
fn the_exhaustion_message_names_the_limit_and_the_command_that_raises_it() {
    let e = StackError::GuardedStacksExhausted {
        limit: 28_669,
        max_map_count: 65_530,
    };
    assert_eq!(
        e.to_string(),
        "out of guarded stacks: 28669 live goroutine stacks use the process's memory-mapping \
         limit (vm.max_map_count = 65530); raise it with `sysctl -w vm.max_map_count=262144` \
         (as root), or opt in to unguarded stacks with the unsafe Builder::unguarded_stacks"
    );
    assert_eq!(
        StackError::GuardBudgetExhausted { limit: 12 }.to_string(),
        "out of guarded stacks: 12 live goroutine stacks use the budget set with \
         stack::set_guard_page_budget; raise it (usize::MAX lifts it), or opt in to unguarded \
         stacks with the unsafe Builder::unguarded_stacks"
    );
}

#[test]
fn when_guarded_stacks_run_out_try_spawn_errs_saying_so() {
    if in_crash_child() {
        // One P: a dead G's stack is reused from that P's free list.
        let rt = Runtime::builder()
            .procs(1)
            .stack_size(STACK)
            .build()
            .unwrap();
        rt.block_on(|| {
            // The main goroutine's stack is live; room for two more.
            let live = guarded_stacks_live();
            set_guard_page_budget(live + 2);
            let limit = guard_page_budget();
            assert_eq!(limit, live + 2);
            let gate = gokernel::chan::<()>(0);
            let started = gokernel::chan::<()>(2);
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let (gate, started) = (gate.clone(), started.clone());
                    gokernel::spawn(move || {
                        started.send(()).unwrap();
                        let _ = gate.recv();
                    })
                })
                .collect();
            // They get their stacks when they first run (lazystack).
            for _ in 0..2 {
                started.recv().unwrap();
            }
            let want = StackError::GuardBudgetExhausted { limit };
            let e = gokernel::try_spawn(|| ()).err().expect("a third stack");
            assert_eq!(e, SpawnError(want));
            let msg = e.to_string();
            for part in [
                &format!("cannot start a goroutine: out of guarded stacks: {limit} live goroutine stacks use the budget set with stack::set_guard_page_budget"),
                "raise it (usize::MAX lifts it), or opt in to unguarded stacks with the unsafe Builder::unguarded_stacks",
            ] {
                assert!(msg.contains(part), "{msg:?} lacks {part:?}");
            }
            // spawn and go allocate at the goroutine's first run (and a
            // failure there is fatal: tests/lazystack.rs), not here.
            // The two finish; their stacks stay with their dead Gs for
            // reuse, so goroutines can start again within the budget.
            gate.close().unwrap();
            for h in hs {
                h.join().unwrap();
            }
            assert_eq!(gokernel::spawn(|| 7).join().unwrap(), 7);
            assert_eq!(guarded_stacks_live(), limit);
        })
        .unwrap();
        // From outside the runtime too (the dead Gs are on the P's free
        // list, which a thread that is not an M does not take from).
        let e = rt.try_spawn(|| ()).err().expect("no guarded stack left");
        assert!(
            matches!(e.0, StackError::GuardBudgetExhausted { .. }),
            "{e}"
        );
        set_guard_page_budget(usize::MAX);
        assert_eq!(rt.block_on(|| 1).unwrap(), 1);
        return;
    }
    run_child_ok("when_guarded_stacks_run_out_try_spawn_errs_saying_so");
}

#[test]
fn an_unguarded_runtime_runs_without_using_guarded_stacks() {
    if in_crash_child() {
        // No guarded stack left for anyone.
        set_guard_page_budget(guarded_stacks_live());
        let guarded = Runtime::builder().procs(1).build().unwrap();
        let e = guarded
            .try_spawn(|| ())
            .err()
            .expect("no guarded stacks left");
        assert!(
            matches!(e.0, StackError::GuardBudgetExhausted { .. }),
            "{e}"
        );
        // SAFETY: these goroutines use a few hundred bytes of their 32 KiB (STACK_MIN).
        let builder = unsafe { Runtime::builder().unguarded_stacks() };
        let rt = builder.procs(2).stack_size(STACK_MIN).build().unwrap();
        let live = guarded_stacks_live();
        let maps = mappings();
        let sum = rt
            .block_on(|| {
                let hs: Vec<_> = (0..2000u64)
                    .map(|i| {
                        gokernel::spawn(move || {
                            gokernel::gosched();
                            i
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
            })
            .unwrap();
        assert_eq!(sum, 1999 * 2000 / 2);
        assert_eq!(
            guarded_stacks_live(),
            live,
            "an unguarded runtime used guarded stacks"
        );
        // Arenas of 256 stacks: about 8 mappings for 2,000 goroutines, not
        // 4,000 (and a few for the Ms' threads).
        let added = mappings().saturating_sub(maps);
        assert!(added < 64, "2,000 unguarded stacks added {added} mappings");
        return;
    }
    run_child_ok("an_unguarded_runtime_runs_without_using_guarded_stacks");
}
