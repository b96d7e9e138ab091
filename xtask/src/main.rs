//! `cargo xtask`: the gokernel workspace's developer commands.
//!
//! `cargo xtask <command>` is an alias (in `.cargo/config.toml`) for
//! `cargo run --quiet --package xtask -- <command>`. The commands:
//!
//! - `offsets [--check]` ([`offsets`]): renders the layout constants of
//!   `gokernel::runtime2` (`OFFSETS`, `SIZES`) as `docs/offsets.md`,
//!   `docs/offsets.inc` and `docs/offsets.h`. With `--check` it writes
//!   nothing and fails if any of those files is missing or out of date.
//! - `test [--help] [STEP]...` ([`gate`]): the single gate CI runs (through
//!   `.ci/run`): formatting, clippy on the host and on the bare target, bare
//!   builds, host tests, loom, the image, instruction counts, docs and the
//!   offsets check, then a summary table. `--help` lists the steps; naming
//!   steps runs only those.
//! - `bench [--instructions] [--update-baseline] [--peers]` ([`bench`]): the
//!   benchmark suite, timed or in instruction counts.
//! - `image [--release] [--fs=…] [--cpus]` ([`image`]): builds the freestanding
//!   image and runs it as a plain Linux process.
//! - `qemu [--cpus N]... [--kvm] [--timeout S] [--release] [--count]`
//!   ([`qemu`]): builds the reference kernel and boots it under QEMU.
//! - `http-bench [--duration SECS] [--rounds N]` ([`httpbench`]): the
//!   HTTP server example under `wrk` beside tokio and Go, and the memory of
//!   idle connections; writes the Network section of `docs/performance.md`.
//! - `soak [--goroutines N]` ([`soak`]): the long soak test.
//! - `valgrind` ([`valgrind`]): the hosted tests under Valgrind.
//! - `trace FILE [-o OUT.svg]` ([`trace`]): draws an execution trace as
//!   an SVG timeline.
//! - `help`: prints the usage.
//!
//! Each command is one row of [`COMMANDS`]: a new command (`bench`, `soak`,
//! `valgrind`, …) is a new module with a `run(&[String]) -> ExitCode` and a
//! new row. External programs are run through [`process`], which echoes,
//! streams and times them out.
//!
//! Exit status: 0 on success, 1 when a command's checks fail, 2 on a usage
//! error.

mod bench;
mod gate;
mod golang;
mod httpbench;
mod image;
mod offsets;
mod peers;
mod process;
mod qemu;
mod soak;
mod tools;
mod trace;
mod valgrind;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::OnceLock;

/// Exit status for a command line that names no known command or passes a
/// command an argument it does not take.
const USAGE_ERROR: u8 = 2;

/// One `cargo xtask` command.
struct Command {
    /// The word that selects it: `cargo xtask <name>`.
    name: &'static str,
    /// Its arguments, as shown in the usage (empty if it takes none).
    args: &'static str,
    /// One line saying what it does.
    summary: &'static str,
    /// Runs it with the arguments that follow its name.
    run: fn(&[String]) -> ExitCode,
}

/// Every command, in the order the usage lists them.
const COMMANDS: &[Command] = &[
    Command {
        name: "offsets",
        args: "[--check]",
        summary: "write docs/offsets.{md,inc,h} from gokernel::runtime2 \
                  (--check: fail if they are stale)",
        run: offsets::run,
    },
    Command {
        name: "bench",
        args: "[--instructions] [--update-baseline] [--peers]",
        summary: "the benchmark suite: a table and <target>/bench.json (--instructions: callgrind counts; --peers: beside tokio and Go)",
        run: bench::run,
    },
    Command {
        name: "trace",
        args: "FILE [-o OUT.svg]",
        summary: "draw a gokernel execution trace (GOKERNEL_TRACE=FILE) as an SVG timeline: a lane per P, goroutine runs, wake-up arrows",
        run: trace::run,
    },
    Command {
        name: "image",
        args: "[--release] [--fs=wrfsbase|fallback|auto]",
        summary: "build the freestanding image and run it as a Linux process (both FS modes)",
        run: image::run,
    },
    Command {
        name: "qemu",
        args: "[--cpus N]... [--kvm] [--timeout S] [--release] [--count]",
        summary: "build the reference kernel and boot it under qemu-system-x86_64 (TCG; 1, 2 and 4 CPUs) \
                  (--count: only count its gokernel-specific lines)",
        run: qemu::run,
    },
    Command {
        name: "http-bench",
        args: "[--duration SECS] [--rounds N]",
        summary: "examples/http.rs under wrk (1,000 connections) beside tokio and Go, and RSS per \
                  idle connection; writes the Network section of docs/performance.md",
        run: httpbench::run,
    },
    Command {
        name: "soak",
        args: "[--goroutines N]",
        summary: "the long soak: N goroutines (default 1,000,000) parking, waking, yielding, spawning",
        run: soak::run,
    },
    Command {
        name: "valgrind",
        args: "",
        summary: "the hosted tests under valgrind's memory checker (0 errors required)",
        run: valgrind::run,
    },
    Command {
        name: "test",
        args: "[--help] [STEP]...",
        summary: "the CI gate: fmt, clippy, builds, tests, loom, image, instruction counts, docs, \
                  offsets (--help: the steps; STEP: run only those)",
        run: gate::run,
    },
    Command {
        name: "help",
        args: "",
        summary: "print this message",
        run: help,
    },
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((name, rest)) = args.split_first() else {
        return help(&[]);
    };
    match COMMANDS.iter().find(|command| command.name == name) {
        Some(command) => (command.run)(rest),
        None => {
            eprintln!("cargo xtask: unknown command `{name}`");
            // Nothing useful can be done if stderr is closed.
            let _ = write_usage(&mut io::stderr());
            ExitCode::from(USAGE_ERROR)
        }
    }
}

/// `cargo xtask help`: the usage, on stdout.
fn help(_args: &[String]) -> ExitCode {
    match write_usage(&mut io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Writes the usage: one line per entry of [`COMMANDS`].
fn write_usage(out: &mut impl Write) -> io::Result<()> {
    writeln!(out, "usage: cargo xtask <command> [args]")?;
    writeln!(out)?;
    writeln!(out, "commands:")?;
    let synopses: Vec<String> = COMMANDS
        .iter()
        .map(|command| format!("{} {}", command.name, command.args))
        .collect();
    let width = synopses.iter().map(String::len).max().unwrap_or(0);
    for (synopsis, command) in synopses.iter().zip(COMMANDS) {
        writeln!(out, "  {synopsis:<width$}  {}", command.summary)?;
    }
    Ok(())
}

/// Reports a bad argument to `cargo xtask <command>` and returns the usage
/// error status.
fn usage_error(command: &str, message: &str) -> ExitCode {
    eprintln!("cargo xtask {command}: {message}");
    if command == "test" {
        eprintln!("run `cargo xtask test --help` for its steps and options");
    } else {
        eprintln!("run `cargo xtask help` for usage");
    }
    ExitCode::from(USAGE_ERROR)
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in a directory of the workspace")
}

/// The workspace's target directory, as cargo sees it: `target/` in the
/// workspace root unless `CARGO_TARGET_DIR`, `build.target-dir` in a cargo
/// config or `--target-dir` says otherwise. Asked once of
/// `cargo metadata --format-version 1 --no-deps`; if that fails, xtask says
/// so and uses `$CARGO_TARGET_DIR` or `target/`.
///
/// Everything xtask builds or writes goes under it: the workspace's own
/// artifacts, and in subdirectories the builds whose `RUSTFLAGS` differ
/// from the plain ones (see [`gate`]), such as the loom build and the
/// image (`image/` is a workspace of its own).
fn target_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = workspace_root();
        let mut c = gate::cargo(root, &["metadata", "--format-version", "1", "--no-deps"]);
        c.stdout(Stdio::piped());
        let asked = c.output().map_err(|e| e.to_string()).and_then(|out| {
            if !out.status.success() {
                return Err(format!("cargo metadata failed: {}", out.status));
            }
            json_string(&String::from_utf8_lossy(&out.stdout), "target_directory")
                .ok_or_else(|| "cargo metadata gave no target_directory".into())
        });
        match asked {
            Ok(dir) => PathBuf::from(dir),
            Err(e) => {
                let dir = std::env::var_os("CARGO_TARGET_DIR")
                    .map(|d| root.join(d))
                    .unwrap_or_else(|| root.join("target"));
                println!("{e}; using {} as the target directory", dir.display());
                dir
            }
        }
    })
}

/// The string value of the first `"key":"…"` in `json`, unescaped (enough
/// for cargo's output, which is compact and has no `\u` escapes in paths
/// of UTF-8 file names).
fn json_string(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut value = String::new();
    let mut chars = json[start..].chars();
    loop {
        match chars.next()? {
            '"' => return Some(value),
            '\\' => value.push(match chars.next()? {
                'n' => '\n',
                't' => '\t',
                c => c, // `\\`, `\"` and `\/` stand for themselves
            }),
            c => value.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_string_reads_cargo_metadata() {
        let json = r#"{"packages":[],"target_directory":"/tmp/a \"b\"\\c","version":1}"#;
        assert_eq!(
            json_string(json, "target_directory").as_deref(),
            Some(r#"/tmp/a "b"\c"#)
        );
        assert_eq!(json_string(json, "workspace_root"), None);
    }

    #[test]
    fn the_target_directory_is_cargos() {
        // With or without CARGO_TARGET_DIR, cargo metadata knows.
        assert!(target_dir().is_absolute(), "{}", target_dir().display());
    }
}
