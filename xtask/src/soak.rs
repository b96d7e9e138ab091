//! `cargo xtask soak [--goroutines N]`: the long soak. Runs
//! `tests/soak.rs` in release with `GOKERNEL_SOAK_GOROUTINES=N` (default
//! 1,000,000): goroutines doing random park / unpark / gosched / spawn on
//! 2 Ms, every one accounted for, RSS checked for leaks. `cargo xtask test`
//! runs the same test with 100,000.

use std::process::ExitCode;
use std::time::Duration;

use crate::process;

/// Goroutines in the long soak.
const DEFAULT_GOROUTINES: usize = 1_000_000;

/// `cargo xtask soak`.
pub fn run(args: &[String]) -> ExitCode {
    let mut n = DEFAULT_GOROUTINES;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.clone().next()) {
            ("--goroutines", Some(v)) => match v.parse() {
                Ok(v) => {
                    n = v;
                    it.next();
                }
                Err(_) => {
                    return crate::usage_error("soak", &format!("`{v}` is not a number"));
                }
            },
            (other, _) => {
                return crate::usage_error("soak", &format!("unexpected argument `{other}`"));
            }
        }
    }
    let root = crate::workspace_root();
    let mut c = crate::gate::cargo(
        root,
        &[
            "test",
            "-p",
            "gokernel",
            "--release",
            "--test",
            "soak",
            "--",
            "--nocapture",
        ],
    );
    c.env("GOKERNEL_SOAK_GOROUTINES", n.to_string());
    println!("soak: {n} goroutines (twice: a warm-up round, then the measured one)");
    match process::run(&mut c, Duration::from_mins(60)) {
        Ok(s) if s.success() => {
            println!("soak: passed");
            ExitCode::SUCCESS
        }
        Ok(s) => {
            println!("soak: FAILED ({s})");
            ExitCode::FAILURE
        }
        Err(f) => {
            println!("soak: {f}");
            ExitCode::FAILURE
        }
    }
}
