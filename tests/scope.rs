//! `Runtime::scope`: goroutines that borrow from the caller, and the
//! scope waits for every one of them whatever happens (a panic of the main
//! closure or of a goroutine, a forgotten handle, a deadlock).

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::in_crash_child;
use gokernel::{Runtime, chan};

fn rt(procs: usize) -> Runtime {
    Runtime::builder().procs(procs).build().unwrap()
}

#[test]
fn scoped_goroutines_borrow_the_callers_locals_and_mutate_disjoint_parts() {
    for procs in [1, 2] {
        let r = rt(procs);
        let mut v: Vec<u64> = (0..1000).collect();
        let total: u64 = v.iter().sum();
        let sums = r.scope(|s| {
            let hs: Vec<_> = v
                .chunks_mut(100)
                .map(|c| {
                    s.spawn(move || {
                        let sum = c.iter().sum::<u64>();
                        c.iter_mut().for_each(|x| *x += 1);
                        sum
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
        });
        assert_eq!(sums, total, "procs = {procs}");
        assert_eq!(v.iter().sum::<u64>(), total + 1000, "procs = {procs}");
    }
}

#[test]
fn the_scope_waits_for_goroutines_nobody_joined_or_whose_handles_were_forgotten() {
    let r = rt(2);
    let done = AtomicUsize::new(0);
    let gate = chan::<()>(0);
    r.scope(|s| {
        for _ in 0..4 {
            s.go(|| {
                gate.recv().unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        let h = s.spawn(|| {
            gate.recv().unwrap();
            done.fetch_add(1, Ordering::SeqCst);
        });
        std::mem::forget(h);
        // Released only after the main closure has returned.
        s.go(|| {
            for _ in 0..5 {
                gate.send(()).unwrap();
            }
        });
    });
    assert_eq!(done.load(Ordering::SeqCst), 5);
}

#[test]
fn a_panic_of_the_main_closure_comes_after_every_goroutine_has_finished() {
    let r = rt(2);
    let wrote = AtomicBool::new(false);
    let gate = chan::<()>(1);
    let p = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        r.scope(|s| {
            s.go(|| {
                gate.recv().unwrap();
                gokernel::sleep(Duration::from_millis(20));
                wrote.store(true, Ordering::SeqCst);
            });
            gate.send(()).unwrap();
            panic!("main closure panics");
        })
    }));
    let msg = p.unwrap_err();
    assert_eq!(msg.downcast_ref::<&str>(), Some(&"main closure panics"));
    assert!(
        wrote.load(Ordering::SeqCst),
        "the scope returned before its goroutine finished"
    );
}

#[test]
fn a_goroutine_panic_nobody_joined_makes_the_scope_panic_and_a_joined_one_does_not() {
    let r = rt(2);
    let other_finished = AtomicBool::new(false);
    let p = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        r.scope(|s| {
            s.go(|| panic!("a scoped goroutine's own panic"));
            s.go(|| {
                gokernel::sleep(Duration::from_millis(20));
                other_finished.store(true, Ordering::SeqCst);
            });
        })
    }));
    let msg = p.unwrap_err();
    assert_eq!(
        msg.downcast_ref::<&str>(),
        Some(&"gokernel: a scoped goroutine panicked")
    );
    assert!(other_finished.load(Ordering::SeqCst));
    // Joined: the panic is the joiner's to handle.
    let v = r.scope(|s| {
        let h = s.spawn(|| -> u32 { panic!("joined") });
        assert!(h.join().is_err());
        7
    });
    assert_eq!(v, 7);
    // The runtime still works.
    assert_eq!(r.block_on(|| 1), Ok(1));
}

#[test]
fn scoped_goroutines_start_more_scoped_goroutines_that_borrow() {
    let r = rt(2);
    let hits = AtomicUsize::new(0);
    r.scope(|s| {
        for _ in 0..3 {
            s.go(|| {
                for _ in 0..3 {
                    s.go(|| {
                        hits.fetch_add(1, Ordering::SeqCst);
                    });
                }
            });
        }
    });
    assert_eq!(hits.into_inner(), 9);
}

#[test]
fn scope_from_a_goroutine_panics_with_a_clear_message() {
    let r = rt(1);
    let inner = std::sync::Arc::new(rt(1));
    let i = inner.clone();
    let res = r.block_on(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| i.scope(|_| ())))
            .unwrap_err()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
    });
    let msg = res.unwrap().unwrap();
    assert!(
        msg.contains("Runtime::scope called from a goroutine"),
        "{msg}"
    );
}

/// Set in the deadlock child.
const CHILD: &str = "GOKERNEL_SCOPE_DEADLOCK_CHILD";

#[test]
fn a_deadlock_inside_a_scope_is_reported_and_the_scope_keeps_waiting() {
    if in_crash_child() || std::env::var_os(CHILD).is_some() {
        let r = rt(1);
        let local = 5u32;
        r.scope(|s| {
            s.go(|| {
                let c = chan::<u32>(0);
                let _ = c.recv().map(|v| v + local);
            });
        });
        println!("the scope returned");
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_deadlock_inside_a_scope_is_reported_and_the_scope_keeps_waiting",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = common::wait_for_stderr(
        child.stderr.take().unwrap(),
        "goes on waiting",
        "deadlock report",
    );
    assert!(
        seen.contains("gokernel: Runtime::scope: all goroutines are asleep - deadlock!"),
        "{seen}"
    );
    assert!(seen.contains(" [chan receive, "), "{seen}");
    // Still waiting: not exited.
    assert!(
        child.try_wait().unwrap().is_none(),
        "the child ended: {seen}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(!out.contains("the scope returned"), "{out}");
}

/// Set in the child of the failing-stderr test: the path of its stderr.
const STDERR_FAILS_CHILD: &str = "GOKERNEL_SCOPE_STDERR_FAILS_CHILD";

#[test]
fn a_scope_whose_deadlock_report_cannot_be_written_still_waits_for_its_goroutines() {
    // The report goes to stderr; a write that fails there (a full disk, a
    // closed pipe) must not end the wait: `eprintln!` panicked, the scope
    // unwound into its caller, and its goroutine, woken later, wrote
    // through a borrow of the caller's dead frame.
    if let Some(path) = std::env::var_os(STDERR_FAILS_CHILD) {
        let path = std::path::PathBuf::from(path);
        let len = std::fs::metadata(&path).unwrap().len();
        // SAFETY: plain libc calls on this process; SIGXFSZ ignored, so a
        // write past the limit fails with EFBIG instead of killing us.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: len + 64,
                rlim_max: len + 64,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        }
        let slot = std::sync::Arc::new(std::sync::Mutex::new(None::<gokernel::Chan<u32>>));
        let s2 = slot.clone();
        // Wakes the goroutine once the report began (and so failed).
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !std::fs::read_to_string(&path)
                .unwrap()
                .contains("Runtime::scope")
            {
                if std::time::Instant::now() > deadline {
                    println!("no deadlock report");
                    std::process::exit(3);
                }
                std::thread::yield_now();
            }
            let c = s2.lock().unwrap().take().unwrap();
            c.send(5).unwrap();
        });
        let r = rt(1);
        let mut got = 0u32;
        let got_ref = &mut got;
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            r.scope(|s| {
                let c = chan::<u32>(0);
                *slot.lock().unwrap() = Some(c.clone());
                s.go(move || *got_ref = c.recv().unwrap());
            })
        }));
        println!("the scope returned: ok {} got {got}", res.is_ok());
        return;
    }
    let path =
        std::env::temp_dir().join(format!("gokernel-scope-stderr-{}.txt", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_scope_whose_deadlock_report_cannot_be_written_still_waits_for_its_goroutines",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(STDERR_FAILS_CHILD, &path)
        .stdout(Stdio::piped())
        .stderr(file)
        .spawn()
        .unwrap();
    let out = common::within(120, "the failing-stderr child", move || {
        child.wait_with_output().unwrap()
    });
    let err = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("the scope returned: ok true got 5"),
        "{:?}\nstdout:\n{stdout}\nstderr:\n{err}",
        out.status
    );
}
