//! Helpers shared by the integration tests: run code on a fresh M, run a
//! closure as a G, and run a crash scenario in a child process.
#![allow(dead_code)] // each test file uses a different part

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::process::Command;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use gokernel::proc::{execute, gostartcallfn, malg, mstart, newgoid};
use gokernel::runtime2::{G, M, status};

static NEXT_MID: AtomicI64 = AtomicI64::new(1);

/// A fresh M id, unique in this process.
pub fn next_mid() -> i64 {
    NEXT_MID.fetch_add(1, Ordering::Relaxed)
}

/// Runs `f` on g0 of a new M on this thread and returns its result. A
/// panic in `f` is caught on g0 and re-raised here.
pub fn on_g0<R>(f: impl FnOnce() -> R) -> R {
    let mut m = M::new(next_mid());
    let mut out = None;
    // SAFETY: this thread runs no M; `m` outlives the call.
    unsafe { mstart(&mut *m, || out = Some(catch_unwind(AssertUnwindSafe(f)))) };
    match out.expect("the M ended before its g0 function returned") {
        Ok(v) => v,
        Err(p) => resume_unwind(p),
    }
}

/// A G ready to run `f` (runnable, with a fresh goid).
pub fn newg(stack_size: usize, f: impl FnOnce() + Send + 'static) -> Box<G> {
    let mut g = malg(stack_size).expect("malg");
    g.set_goid(newgoid());
    // SAFETY: the G is new: not running, its stack unused.
    unsafe { gostartcallfn(&mut *g, Box::new(f)) };
    g
}

/// Runs `f` as a G on a new M on this thread, until the G exits. A panic
/// in `f` is caught inside the G and re-raised here, so a failed assertion
/// fails the test with its message.
pub fn run_in_g<R: Send + 'static>(stack_size: usize, f: impl FnOnce() -> R + Send + 'static) -> R {
    let out = Arc::new(Mutex::new(None));
    let slot = out.clone();
    let mut g = newg(stack_size, move || {
        let r = catch_unwind(AssertUnwindSafe(f));
        *slot.lock().unwrap() = Some(r);
    });
    let gp: *mut G = &mut *g;
    let mut m = M::new(next_mid());
    // SAFETY: this thread runs no M; gp is runnable and only this M runs
    // it; when it exits, schedule ends the M and mstart returns.
    unsafe { mstart(&mut *m, || execute(gp, false)) };
    assert_eq!(g.readgstatus(), status::DEAD, "the G did not finish");
    let r = out
        .lock()
        .unwrap()
        .take()
        .expect("the G produced no result");
    match r {
        Ok(v) => v,
        Err(p) => resume_unwind(p),
    }
}

/// The caller's stack pointer (rsp before the `call` to this function).
#[unsafe(naked)]
pub extern "C" fn caller_sp() -> usize {
    core::arch::naked_asm!("lea rax, [rsp + 8]", "ret")
}

/// Set in the child process of a crash test.
const CHILD_ENV: &str = "GOKERNEL_CRASH_CHILD";

/// True in the child process of a crash test: the test should crash.
pub fn in_crash_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// What a crash child did.
pub struct Crash {
    pub stdout: String,
    pub stderr: String,
    pub signal: Option<i32>,
    pub code: Option<i32>,
}

/// Re-runs the test `name` (of this test binary) in a child process with
/// [`in_crash_child`] true, and returns how it ended.
pub fn run_crash_child(name: &str) -> Crash {
    run_crash_child_with_env(name, &[])
}

/// [`run_crash_child`] with extra environment variables for the child.
pub fn run_crash_child_with_env(name: &str, env: &[(&str, &str)]) -> Crash {
    use std::os::unix::process::ExitStatusExt;
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .envs(env.iter().copied())
        .output()
        .expect("spawn the crash child");
    Crash {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        signal: out.status.signal(),
        code: out.status.code(),
    }
}

/// Asserts that the child aborted (SIGABRT) with every one of `expected`
/// in its stderr.
pub fn assert_aborted_with(c: &Crash, expected: &[&str]) {
    assert_eq!(
        c.signal,
        Some(libc_sigabrt()),
        "the child should die of SIGABRT; it ended with code {:?}, signal {:?}; stderr:\n{}",
        c.code,
        c.signal,
        c.stderr
    );
    for e in expected {
        assert!(
            c.stderr.contains(e),
            "stderr lacks {e:?}; stderr:\n{}",
            c.stderr
        );
    }
}

fn libc_sigabrt() -> i32 {
    6
}

/// A field of /proc/self/status, in kB (`VmRSS:`, `VmSize:`).
pub fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// CPU time (user + system) of the whole process so far.
pub fn process_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// This process's resident set, in kB.
pub fn rss_kb() -> u64 {
    status_kb("VmRSS:")
}

/// This process's memory mappings.
pub fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

/// Re-runs the test `name` in a child process (as [`run_crash_child`]) for
/// a test that changes process-wide state or counts the process's
/// mappings, and asserts that the child passed.
pub fn run_child_ok(name: &str) -> Crash {
    run_child_ok_with_env(name, &[])
}

/// [`run_child_ok`] with extra environment variables for the child.
pub fn run_child_ok_with_env(name: &str, env: &[(&str, &str)]) -> Crash {
    let c = run_crash_child_with_env(name, env);
    assert_eq!(
        c.code,
        Some(0),
        "the child test failed (signal {:?}); stderr:\n{}",
        c.signal,
        c.stderr
    );
    assert!(
        c.stdout.contains("test result: ok. 1 passed"),
        "the child did not run the test {name:?}; stdout:\n{}",
        c.stdout
    );
    c
}

/// This process's memory mappings, by start address: (end, permissions).
pub fn mapping_table() -> std::collections::HashMap<usize, (usize, String)> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (a, b) = w.next()?.split_once('-')?;
            let perms = w.next()?.to_string();
            Some((
                usize::from_str_radix(a, 16).ok()?,
                (usize::from_str_radix(b, 16).ok()?, perms),
            ))
        })
        .collect()
}

/// The `vm.max_map_count` [`raise_max_map_count`] raises the sysctl to:
/// room for a million guarded stacks and more (1,095,904 with the reserve,
/// `stack::guarded_stack_limit`).
pub const MAX_MAP_COUNT: usize = 2_200_000;

/// Raises `vm.max_map_count` to [`MAX_MAP_COUNT`] if it is lower (never
/// lowers it), so that a test can have a million guarded stacks; false,
/// with a line on stderr saying so, if it is lower and cannot be raised
/// (not root, read-only /proc/sys): the test then opts in to unguarded
/// stacks. `who` names the test in that line.
pub fn raise_max_map_count(who: &str) -> bool {
    const PATH: &str = "/proc/sys/vm/max_map_count";
    let Some(cur) = std::fs::read_to_string(PATH)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
    else {
        eprintln!("{who}: cannot read {PATH}; using unguarded stacks (Builder::unguarded_stacks)");
        return false;
    };
    if cur >= MAX_MAP_COUNT {
        return true;
    }
    match std::fs::write(PATH, format!("{MAX_MAP_COUNT}\n")) {
        Ok(()) => {
            eprintln!("{who}: raised vm.max_map_count from {cur} to {MAX_MAP_COUNT}");
            true
        }
        Err(e) => {
            eprintln!(
                "{who}: vm.max_map_count is {cur} and cannot be raised to {MAX_MAP_COUNT} ({e}); \
                 using unguarded stacks (Builder::unguarded_stacks) instead"
            );
            false
        }
    }
}

/// Runs `f` on a thread of its own; fails the test (naming `what`) if it
/// takes over `secs` seconds: a hang becomes a failure, not a stuck run.
pub fn within<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} took over {secs} s"))
}

/// `n` goroutines that yield in a loop until `stop`, keeping every P busy
/// (call from a goroutine).
pub fn busy_peers(
    n: usize,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Vec<gokernel::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let stop = stop.clone();
            gokernel::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    gokernel::gosched();
                }
            })
        })
        .collect()
}

/// Reads a child's stderr on a thread until its text so far contains
/// `want`, and returns that text. Fails naming `what` (and showing what
/// came) if `want` does not appear within 60 s of the last output.
pub fn wait_for_stderr(mut err: std::process::ChildStderr, want: &str, what: &str) -> String {
    use std::io::Read;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut text = String::new();
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            let _ = tx.send(text.clone());
        }
    });
    let mut seen = String::new();
    while !seen.contains(want) {
        seen = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no {what}; stderr so far:\n{seen}"));
    }
    seen
}

/// True if this process can read the byte at `addr`: `process_vm_readv`
/// on itself, which fails with `EFAULT` on a guard page (a guard marker or
/// `PROT_NONE`) instead of faulting, and reads an untouched page as zero.
pub fn readable(addr: usize) -> bool {
    let mut byte = 0u8;
    let local = libc::iovec {
        iov_base: (&raw mut byte).cast(),
        iov_len: 1,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: the kernel writes one byte into `byte` and checks `addr`
    // itself: an address this process cannot read is an error, not a
    // fault.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    n == 1
}

/// Like [`spin_the_only_p`], but the spinner stops by itself once the
/// runtime's shutdown has begun (`gokernel::shutting_down`): a drop of the
/// runtime then finds every goroutine queued behind it still unrun.
#[allow(dead_code)]
pub fn spin_the_only_p_until_shutdown(r: &gokernel::Runtime) -> gokernel::JoinHandle<()> {
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};
    let spinning = Arc::new(AtomicBool::new(false));
    let s2 = spinning.clone();
    let h = r.spawn(move || {
        s2.store(true, Ordering::SeqCst);
        while !gokernel::shutting_down() {
            std::hint::spin_loop();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !spinning.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the spinner never ran");
        std::thread::yield_now();
    }
    h
}

/// Starts a goroutine that holds the only P of `r` spinning, without
/// yielding, until the returned flag is set; returns once it spins.
pub fn spin_the_only_p(
    r: &gokernel::Runtime,
) -> (Arc<std::sync::atomic::AtomicBool>, gokernel::JoinHandle<()>) {
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};
    let (spinning, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (s2, st2) = (spinning.clone(), stop.clone());
    let h = r.spawn(move || {
        s2.store(true, Ordering::SeqCst);
        while !st2.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !spinning.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the spinner never ran");
        std::thread::yield_now();
    }
    (stop, h)
}

/// Threads of this process that are (or were) Ms of a runtime (named
/// `gokernel-m…`).
pub fn m_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("gokernel-m"))
        .count()
}
