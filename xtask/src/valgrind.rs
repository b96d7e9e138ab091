//! `cargo xtask valgrind`: the hosted test suite under Valgrind's memory
//! checker, which must report 0 errors.
//!
//! Goroutine stacks are registered with Valgrind (client requests in
//! `src/stack.rs`), so switching between them is not mistaken for wild
//! stack-pointer moves. Each test binary runs under
//! `valgrind --error-exitcode=99` with one test thread. Under Valgrind:
//!
//! - `GOKERNEL_VALGRIND=1` makes the tests that measure RSS or CPU time
//!   skip those measurements (Valgrind's own memory and slowness make them
//!   meaningless) while still running their logic;
//! - the soak runs 10,000 goroutines;
//! - the million-goroutine test is skipped (Valgrind's shadow memory would
//!   need tens of GiB).
//!
//! Crash tests run their crashing half in a child process, which Valgrind
//! does not follow: those children run natively.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use crate::{process, tools};

/// Test binaries left out entirely.
const SKIP_BINARIES: &[&str] = &["million", "tidy"];

/// `cargo xtask valgrind`.
pub fn run(args: &[String]) -> ExitCode {
    if let Some(a) = args.first() {
        return crate::usage_error("valgrind", &format!("unexpected argument `{a}`"));
    }
    if let Err(missing) = tools::ensure(&tools::VALGRIND) {
        println!("valgrind: {missing}");
        return ExitCode::FAILURE;
    }
    let root = crate::workspace_root();
    let mut build = crate::gate::cargo(
        root,
        &[
            "test",
            "-p",
            "gokernel",
            "--no-run",
            "--message-format=json",
        ],
    );
    let out = match process::output(&mut build, Duration::from_mins(10)) {
        Ok((s, out)) if s.success() => out,
        _ => {
            println!("valgrind: building the tests failed");
            return ExitCode::FAILURE;
        }
    };
    let bins = test_executables(&out);
    let mut failed = Vec::new();
    let mut passed = 0;
    for bin in bins {
        let name = bin
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit_once('-').map(|(a, _)| a.to_string()))
            .unwrap_or_default();
        if SKIP_BINARIES.contains(&name.as_str()) {
            println!("\n==> {name}: skipped under valgrind");
            continue;
        }
        println!("\n==> {name}");
        let start = Instant::now();
        let mut c = Command::new("valgrind");
        c.args(["--error-exitcode=99", "-q"])
            .arg(&bin)
            .arg("--test-threads=1")
            .env("GOKERNEL_VALGRIND", "1")
            .env("GOKERNEL_SOAK_GOROUTINES", "10000");
        let ok = matches!(process::run(&mut c, Duration::from_mins(20)), Ok(s) if s.success());
        println!(
            "<== {name}: {} in {:.1}s",
            if ok { "PASS" } else { "FAIL" },
            start.elapsed().as_secs_f64()
        );
        if ok {
            passed += 1;
        } else {
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        println!(
            "\nfailed under valgrind (errors or test failures): {}",
            failed.join(", ")
        );
    }
    println!("valgrind: {passed} passed, {} failed", failed.len());
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The `"executable"` paths of test artifacts in cargo's JSON messages.
fn test_executables(json: &str) -> Vec<PathBuf> {
    json.lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"test\":true"))
        .filter_map(|l| {
            let rest = l.split("\"executable\":\"").nth(1)?;
            Some(PathBuf::from(rest.split('"').next()?))
        })
        .collect()
}
