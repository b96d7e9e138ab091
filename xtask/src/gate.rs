//! `cargo xtask test`: the single gate CI runs (through `.ci/run`).
//!
//! The steps, in order:
//!
//! 1. bare target: make sure `x86_64-unknown-none` is installed for the
//!    pinned toolchain (`rustup target add` if it is not). If it cannot be,
//!    the bare steps below fall back to a freestanding build for the host
//!    triple (`--no-default-features`, no `--target`) and the summary says
//!    so.
//! 2. `cargo fmt --all -- --check`
//! 3. `cargo clippy --workspace --all-targets -- -D warnings` (host, `std`)
//! 4. `cargo clippy -p gokernel --lib --no-default-features --target
//!    x86_64-unknown-none -- -D warnings`
//! 5. `cargo build -p gokernel --lib --no-default-features --target
//!    x86_64-unknown-none`, debug then `--release`: clippy does no codegen,
//!    and naked asm is only assembled at codegen.
//! 6. `cargo test --workspace --no-fail-fast` (host, debug), then
//!    `cargo test -p gokernel --release`: the switch code must hold up
//!    under the optimiser too, and the heavy tests run fast there; then
//!    `cargo test -p gokernel --features trace --test trace --test dump
//!    --test chan`: the execution trace's hooks, compiled in
//! 7. loom (runq): `cargo test -p gokernel --release --test loom_runq` with
//!    `RUSTFLAGS="--cfg loom"`, `CARGO_TARGET_DIR=<target>/loom` and
//!    `LOOM_MAX_PREEMPTIONS=5`: the run queue model-checked on its 4-slot
//!    loom ring (test timeout)
//! 8. the freestanding image (`image/`, see [`image`]): built in debug and
//!    in release (fat LTO) for `x86_64-unknown-none` (or, falling back,
//!    freestanding for the host triple), each build run as a Linux process
//!    with the FS base set by `wrfsbase` and by `arch_prctl`
//! 9. the reference kernel (`kernel/`, see [`qemu`]): fmt, clippy, a
//!    debug build for `x86_64-unknown-none` (no fallback: it fails
//!    naming the target when it is missing), its gokernel-specific line
//!    count against [`qemu::GLUE_LIMIT`], and boots under
//!    `qemu-system-x86_64` (TCG) on 1, 2 and 4 CPUs. QEMU is installed
//!    first when it is missing and can be (as root, with apt-get: the
//!    `qemu-system-x86` package); if it cannot, the step fails naming the
//!    package
//! 10. instruction counts: the switch, gosched, spawn and hand-off paths
//!     under callgrind, in the default (bound) thread-binding mode, must
//!     stay within 10 % of `bench/baseline.json` (see [`bench`]); cannot
//!     flake, since counts do not depend on load. Valgrind is installed
//!     first if it is missing and can be (as root, with apt-get; see
//!     [`tools`]); if it cannot, the step fails saying so, not that a
//!     count grew
//! 11. `cargo doc -p gokernel --no-deps` with `RUSTDOCFLAGS=-D warnings`,
//!     with and without the `std` feature
//! 12. `cargo xtask offsets --check`, run in-process
//!
//! Each step is announced as `==> <name>`; each command it runs is echoed
//! as `$ <command line>`, inherits the environment, streams its output and
//! is killed if it outlives the step's timeout (20 minutes for tests, 10
//! for the rest). Every step runs even if an earlier one failed. At the end
//! comes a table of steps with PASS/FAIL and seconds, the bare-target mode,
//! and then, as the very last line, `summary: N passed, M failed` — CI
//! parses that exact shape. The exit status is 1 if any step failed.
//!
//! `cargo xtask test --help` lists the steps by id (`fmt`, `clippy-host`,
//! `image-build-debug`, …) with what each runs; `cargo xtask test ID…` (or
//! `--step ID`) runs only those, after the bare-target step, and a name
//! that begins ids runs them all (`image`, `clippy`, `test`).
//!
//! Everything is built in cargo's target directory (`CARGO_TARGET_DIR`
//! is respected; see [`crate::target_dir`]), written `<target>` here.
//! The loom build, the image and the kernel (workspaces of their own) get
//! subdirectories of it (`loom/`, `image/`, `kernel/`), so that each has
//! one known place whatever `CARGO_TARGET_DIR` says.
//!
//! Steps 2–12 are the [`Step`]s listed by [`steps`]; a new step (a release
//! test run, a freestanding image run, …) is one more entry there, with an
//! id.

use std::env;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use crate::image::{self, ImageTarget};
#[cfg(doc)]
use crate::tools;
use crate::{bench, offsets, process, qemu};

/// The bare-metal target the library is built for.
const BARE_TARGET: &str = "x86_64-unknown-none";

/// Timeout for steps that run tests.
const TEST_TIMEOUT: Duration = Duration::from_mins(20);

/// The preemption bound for the loom step: the run queue's model checks
/// (`tests/loom_runq.rs`) explore about 575,000 executions with it, in
/// about 35 s in release on 2 cores (8: over 10 minutes).
const LOOM_MAX_PREEMPTIONS: &str = "5";

/// Timeout for every other step.
const STEP_TIMEOUT: Duration = Duration::from_mins(10);

/// How the "bare" steps build the library.
#[derive(Clone, Copy)]
pub(crate) enum BareMode {
    /// For `x86_64-unknown-none`, which is installed.
    Target,
    /// For the host triple, `--no-default-features`: the target could not
    /// be installed.
    HostFallback,
}

impl BareMode {
    /// The `--target` arguments for a bare cargo command.
    fn target_args(self) -> &'static [&'static str] {
        match self {
            Self::Target => &["--target", BARE_TARGET],
            Self::HostFallback => &[],
        }
    }

    /// How the bare steps were built, for the summary.
    fn describe(self) -> &'static str {
        match self {
            Self::Target => "x86_64-unknown-none",
            Self::HostFallback => {
                "FALLBACK: freestanding build for the host triple \
                 (x86_64-unknown-linux-gnu, --no-default-features); \
                 x86_64-unknown-none was not installed"
            }
        }
    }
}

/// One step of the gate after the bare-target step.
struct Step {
    /// What selects it on the command line (`cargo xtask test <id>`): lower
    /// case, words joined by `-`, grouped by their first words (`image-…`).
    id: &'static str,
    /// The name shown in `==> <name>` and in the summary table.
    name: &'static str,
    action: Action,
}

/// The id of the bare-target step, which always runs first.
const BARE_STEP: &str = "bare-target";

/// What a [`Step`] does.
enum Action {
    /// Runs an external command; the step passes if it exits with 0.
    Run { command: Command, timeout: Duration },
    /// Runs a check inside xtask; the step passes if it returns `true`.
    InProcess {
        /// The equivalent command line, echoed after `$`.
        command_line: String,
        check: Box<dyn FnOnce(&Path) -> bool>,
    },
}

/// How one step went.
struct Outcome {
    name: &'static str,
    passed: bool,
    elapsed: Duration,
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Request {
    /// `--help`.
    Help,
    /// The steps to run: all of them if empty, else those these select.
    Steps(Vec<String>),
}

/// Parses the arguments of `cargo xtask test`: `-h`/`--help`, and step
/// names given bare or as `--step NAME` / `--step=NAME`.
fn parse_args(args: &[String]) -> Result<Request, String> {
    let mut selected = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Request::Help),
            "--step" => match args.next() {
                Some(name) => selected.push(name.clone()),
                None => return Err("`--step` needs a step name".into()),
            },
            other => match other.strip_prefix("--step=") {
                Some(name) => selected.push(name.into()),
                None if other.starts_with('-') => {
                    return Err(format!("unknown option `{other}`"));
                }
                None => selected.push(other.into()),
            },
        }
    }
    Ok(Request::Steps(selected))
}

/// True if the name `wanted` selects the step `id`: the whole id, or its
/// first words (`image` selects `image-build-debug`, `clippy` selects
/// `clippy-host` and `clippy-bare`).
fn selects(wanted: &str, id: &str) -> bool {
    id.strip_prefix(wanted)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
}

/// `cargo xtask test`.
pub fn run(args: &[String]) -> ExitCode {
    let selected = match parse_args(args) {
        Ok(Request::Help) => {
            print!("{}", help_text());
            return ExitCode::SUCCESS;
        }
        Ok(Request::Steps(selected)) => selected,
        Err(message) => return crate::usage_error("test", &message),
    };
    let root = crate::workspace_root();
    // Every name must select something, checked before anything runs (the
    // ids do not depend on the bare mode).
    let ids: Vec<&str> = [BARE_STEP]
        .into_iter()
        .chain(steps(root, BareMode::Target).iter().map(|step| step.id))
        .collect();
    if let Some(unknown) = selected
        .iter()
        .find(|wanted| !ids.iter().any(|id| selects(wanted, id)))
    {
        return crate::usage_error(
            "test",
            &format!(
                "no step is called `{unknown}`; the steps are: {}",
                ids.join(", ")
            ),
        );
    }

    // Set by the bare-target step, which always runs: the others depend on
    // it. It always passes: without the target the bare steps fall back,
    // and the summary says so.
    let mut mode = BareMode::HostFallback;
    let mut outcomes = vec![run_step("bare target", || {
        mode = ensure_bare_target(root);
        true
    })];
    for step in steps(root, mode) {
        let Step { id, name, action } = step;
        if selected.is_empty() || selected.iter().any(|wanted| selects(wanted, id)) {
            outcomes.push(run_step(name, || perform(root, action)));
        }
    }

    print_summary(&outcomes, mode);
    if outcomes.iter().all(|outcome| outcome.passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The steps after the bare-target step, in order.
fn steps(root: &Path, mode: BareMode) -> Vec<Step> {
    let target = crate::target_dir();
    let bare = |subcommand: &str, extra: &[&str]| {
        let mut command = cargo(root, &[subcommand, "-p", "gokernel", "--lib"]);
        command
            .arg("--no-default-features")
            .args(mode.target_args())
            .args(extra);
        command
    };
    let mut doc = cargo(root, &["doc", "-p", "gokernel", "--no-deps"]);
    doc.env("RUSTDOCFLAGS", "-D warnings");
    // What an embedder's `cargo doc` sees: no links to std-only items.
    let mut doc_bare = cargo(
        root,
        &[
            "doc",
            "-p",
            "gokernel",
            "--no-deps",
            "--no-default-features",
        ],
    );
    doc_bare.env("RUSTDOCFLAGS", "-D warnings");
    // Its own target dir: `--cfg loom` rebuilds every crate (and adds
    // loom), none of which the other steps can use.
    let mut loom = cargo(
        root,
        &["test", "-p", "gokernel", "--release", "--test", "loom_runq"],
    );
    loom.env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", target.join("loom"))
        .env("LOOM_MAX_PREEMPTIONS", LOOM_MAX_PREEMPTIONS);

    vec![
        Step::run(
            "fmt",
            "fmt",
            cargo(root, &["fmt", "--all", "--", "--check"]),
        ),
        Step::run(
            "clippy-host",
            "clippy (host)",
            cargo(
                root,
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            ),
        ),
        Step::run(
            "clippy-bare",
            "clippy (bare)",
            bare("clippy", &["--", "-D", "warnings"]),
        ),
        Step::run(
            "build-bare-debug",
            "build (bare, debug)",
            bare("build", &[]),
        ),
        Step::run(
            "build-bare-release",
            "build (bare, release)",
            bare("build", &["--release"]),
        ),
        Step::test(
            "test-debug",
            "test (host, debug)",
            cargo(root, &["test", "--workspace", "--no-fail-fast"]),
        ),
        Step::test(
            "test-release",
            "test (host, release)",
            cargo(
                root,
                &["test", "-p", "gokernel", "--release", "--no-fail-fast"],
            ),
        ),
        Step::test(
            "test-trace",
            "test (trace feature)",
            cargo(
                root,
                &[
                    "test",
                    "-p",
                    "gokernel",
                    "--features",
                    "trace",
                    "--test",
                    "trace",
                    "--test",
                    "dump",
                    "--test",
                    "chan",
                    "--no-fail-fast",
                ],
            ),
        ),
        Step::test("loom", "loom (runq)", loom),
    ]
    .into_iter()
    .chain(image_steps(root, mode))
    .chain(kernel_steps(root, mode))
    .chain([
        Step {
            id: "instructions",
            name: "instruction counts",
            action: Action::InProcess {
                command_line:
                    "cargo xtask bench --instructions  # bound mode vs bench/baseline.json".into(),
                check: Box::new(bench::check_baseline),
            },
        },
        Step::run("doc", "doc", doc),
        Step::run("doc-nostd", "doc (no std)", doc_bare),
        Step {
            id: "offsets",
            name: "offsets --check",
            action: Action::InProcess {
                command_line: "cargo xtask offsets --check  # in-process".into(),
                check: Box::new(offsets::check),
            },
        },
    ])
    .collect()
}

/// The freestanding image: built in debug and in release (fat LTO), each
/// run in both FS-base modes and in CPU mode (see [`image`]).
fn image_steps(root: &Path, mode: BareMode) -> Vec<Step> {
    let target = match mode {
        BareMode::Target => ImageTarget::Bare,
        BareMode::HostFallback => ImageTarget::HostFallback,
    };
    let mut steps = vec![
        Step::run(
            "image-fmt",
            "fmt (image)",
            cargo(
                root,
                &[
                    "fmt",
                    "--manifest-path",
                    "image/Cargo.toml",
                    "--",
                    "--check",
                ],
            ),
        ),
        Step::run(
            "image-clippy",
            "clippy (image)",
            image::clippy_command(root, target),
        ),
    ];
    for (release, id, profile) in [
        (false, "debug", "debug"),
        (true, "release", "release, fat LTO"),
    ] {
        steps.push(Step::run(
            leak(format!("image-build-{id}")),
            leak(format!("image build ({profile})")),
            image::build_command(root, target, release),
        ));
        for fs in image::RUN_MODES {
            let path = image::binary(target, release);
            steps.push(Step {
                id: leak(format!("image-run-{id}-{fs}")),
                name: leak(format!("image run ({profile}, {fs})")),
                action: Action::InProcess {
                    command_line: format!("{} {}", path.display(), image::run_args(fs).join(" ")),
                    check: Box::new(move |_| image::run_image(&path, fs)),
                },
            });
        }
    }
    steps
}

/// The reference kernel: fmt, clippy, a debug build, its glue count, and
/// boots under QEMU on 1, 2 and 4 CPUs (see [`qemu`]). It needs the bare
/// target: without it the build steps fail, saying so.
fn kernel_steps(root: &Path, mode: BareMode) -> Vec<Step> {
    let needs_target = |id: &'static str, name: &'static str, command: Command| match mode {
        BareMode::Target => Step::run(id, name, command),
        BareMode::HostFallback => Step {
            id,
            name,
            action: Action::InProcess {
                command_line: process::command_line(&command),
                check: Box::new(|_| {
                    println!(
                        "the reference kernel needs the {BARE_TARGET} target, which is not \
                         installed and could not be added (`rustup target add {BARE_TARGET}`)"
                    );
                    false
                }),
            },
        },
    };
    let kernel = qemu::binary(false);
    let cpus = qemu::DEFAULT_CPUS;
    vec![
        Step::run(
            "kernel-fmt",
            "fmt (kernel)",
            cargo(
                root,
                &[
                    "fmt",
                    "--manifest-path",
                    "kernel/Cargo.toml",
                    "--",
                    "--check",
                ],
            ),
        ),
        needs_target(
            "kernel-clippy",
            "clippy (kernel)",
            qemu::clippy_command(root),
        ),
        needs_target(
            "kernel-build",
            "kernel build (debug)",
            qemu::build_command(root, false),
        ),
        Step {
            id: "kernel-glue",
            name: "kernel glue lines",
            action: Action::InProcess {
                command_line: "cargo xtask qemu --count  # in-process".into(),
                check: Box::new(qemu::check_glue),
            },
        },
        Step {
            id: "kernel-qemu",
            name: "kernel under QEMU (TCG; 1, 2, 4 CPUs)",
            action: Action::InProcess {
                command_line: format!(
                    "cargo xtask qemu  # boots {} on {cpus:?} CPUs",
                    kernel.display()
                ),
                check: Box::new(move |_| {
                    qemu::boot_all(&kernel, &cpus, false, qemu::DEFAULT_TIMEOUT)
                }),
            },
        },
    ]
}

/// A step name made at run time (steps live until xtask exits).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

impl Step {
    /// A step that runs `command` with the default timeout.
    fn run(id: &'static str, name: &'static str, command: Command) -> Self {
        Self {
            id,
            name,
            action: Action::Run {
                command,
                timeout: STEP_TIMEOUT,
            },
        }
    }

    /// A step that runs tests with `command`, with the test timeout.
    fn test(id: &'static str, name: &'static str, command: Command) -> Self {
        Self {
            id,
            name,
            action: Action::Run {
                command,
                timeout: TEST_TIMEOUT,
            },
        }
    }

    /// What the step runs, as `--help` shows it.
    fn command_line(&self) -> String {
        match &self.action {
            Action::Run { command, .. } => process::command_line(command),
            Action::InProcess { command_line, .. } => command_line.clone(),
        }
    }
}

/// The text of `cargo xtask test --help`: the usage, the options, and every
/// step with its id, its name and what it runs.
fn help_text() -> String {
    let root = crate::workspace_root();
    let steps = steps(root, BareMode::Target);
    let width = steps
        .iter()
        .map(|step| step.id.len())
        .chain([BARE_STEP.len()])
        .max()
        .unwrap_or(0);
    let mut text = format!(
        "\
usage: cargo xtask test [--step STEP]... [STEP]...

The CI gate. Runs every step below in order, or only the STEPs named; a name
also selects the steps whose id it begins (`image` runs every image-… step,
`clippy` both clippy-… steps). The bare-target step always runs first: the
others depend on it. Every step runs even if an earlier one failed; the last
line is `summary: N passed, M failed` and the exit status is 1 if a step
failed (2 for a bad command line).

options:
  -h, --help     print this message
  --step STEP    run STEP (the same as naming it)

environment:
  CARGO_TARGET_DIR   where everything is built (as is build.target-dir in a
                     cargo config); builds with RUSTFLAGS of their own use
                     subdirectories of it (loom/, image/, kernel/). Now:
                     {}

steps (id, then what it runs):
  {BARE_STEP:<width$}  rustup target add {BARE_TARGET}, if it is missing (else a
  {:<width$}  freestanding build for the host triple, said in the summary)
",
        crate::target_dir().display(),
        ""
    );
    for step in &steps {
        let _ = writeln!(text, "  {:<width$}  {}", step.id, step.command_line());
    }
    text
}

/// A `cargo` command (`$CARGO` if set, so that the toolchain running xtask
/// is the one tested) with `args`, run in the workspace root.
pub(crate) fn cargo(root: &Path, args: &[&str]) -> Command {
    let program = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(program);
    command.current_dir(root).args(args);
    command
}

/// Announces a step, runs `body`, and prints and returns how it went.
fn run_step(name: &'static str, body: impl FnOnce() -> bool) -> Outcome {
    println!();
    println!("==> {name}");
    let start = Instant::now();
    let passed = body();
    let elapsed = start.elapsed();
    println!(
        "<== {name}: {} in {:.1}s",
        verdict(passed),
        elapsed.as_secs_f64()
    );
    Outcome {
        name,
        passed,
        elapsed,
    }
}

/// Does what `action` says from `root`; returns whether it passed.
fn perform(root: &Path, action: Action) -> bool {
    match action {
        Action::Run {
            mut command,
            timeout,
        } => match process::run(&mut command, timeout) {
            Ok(status) if status.success() => true,
            Ok(status) => {
                println!("command failed: {status}");
                false
            }
            Err(failure) => {
                println!("command {failure}");
                false
            }
        },
        Action::InProcess {
            command_line,
            check,
        } => {
            println!("$ {command_line}");
            check(root)
        }
    }
}

/// Makes sure the bare target is installed for the workspace's toolchain,
/// installing it if rustup can; returns how the bare steps must build.
pub(crate) fn ensure_bare_target(root: &Path) -> BareMode {
    let mut list = rustup(root, &["target", "list", "--installed"]);
    let installed = match process::output(&mut list, STEP_TIMEOUT) {
        Ok((status, stdout)) if status.success() => {
            stdout.lines().any(|line| line.trim() == BARE_TARGET)
        }
        Ok((status, _)) => return bare_target_missing(&format!("rustup failed: {status}")),
        Err(failure) => return bare_target_missing(&format!("rustup {failure}")),
    };
    if installed {
        println!("{BARE_TARGET} is installed");
        return BareMode::Target;
    }
    let mut add = rustup(root, &["target", "add", BARE_TARGET]);
    match process::run(&mut add, STEP_TIMEOUT) {
        Ok(status) if status.success() => BareMode::Target,
        Ok(status) => bare_target_missing(&format!("rustup failed: {status}")),
        Err(failure) => bare_target_missing(&format!("rustup {failure}")),
    }
}

/// Says why the bare target is unavailable and that the fallback is used.
fn bare_target_missing(reason: &str) -> BareMode {
    println!("{reason}");
    println!(
        "{BARE_TARGET} is not installed and could not be added; falling back to a \
         freestanding build for the host triple (x86_64-unknown-linux-gnu, \
         --no-default-features)"
    );
    BareMode::HostFallback
}

/// A `rustup` command with `args`, run in the workspace root so that
/// `rust-toolchain.toml` selects the toolchain.
fn rustup(root: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("rustup");
    command.current_dir(root).args(args);
    command
}

/// Prints the table of outcomes, the bare-target mode, and last the
/// `summary:` line CI parses.
fn print_summary(outcomes: &[Outcome], mode: BareMode) {
    let width = outcomes
        .iter()
        .map(|outcome| outcome.name.len())
        .chain(["step".len()])
        .max()
        .unwrap_or(0);
    println!();
    println!("{:<width$}  result  seconds", "step");
    for outcome in outcomes {
        println!(
            "{:<width$}  {:<6}  {:>7.1}",
            outcome.name,
            verdict(outcome.passed),
            outcome.elapsed.as_secs_f64()
        );
    }
    println!();
    println!("bare target: {}", mode.describe());
    let passed = outcomes.iter().filter(|outcome| outcome.passed).count();
    println!(
        "summary: {passed} passed, {} failed",
        outcomes.len() - passed
    );
}

/// `PASS` or `FAIL`.
fn verdict(passed: bool) -> &'static str {
    if passed { "PASS" } else { "FAIL" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn steps_are_named_bare_or_with_step() {
        let steps = |names: &[&str]| Ok(Request::Steps(args(names)));
        assert_eq!(parse_args(&[]), steps(&[]));
        assert_eq!(parse_args(&args(&["clippy"])), steps(&["clippy"]));
        assert_eq!(
            parse_args(&args(&["--step", "fmt", "--step=doc", "loom"])),
            steps(&["fmt", "doc", "loom"])
        );
        assert_eq!(parse_args(&args(&["fmt", "--help"])), Ok(Request::Help));
        assert_eq!(parse_args(&args(&["-h"])), Ok(Request::Help));
        assert!(parse_args(&args(&["--step"])).is_err());
        assert!(parse_args(&args(&["--fast"])).is_err());
    }

    #[test]
    fn a_name_selects_its_step_and_the_steps_it_begins() {
        assert!(selects("clippy-host", "clippy-host"));
        assert!(selects("clippy", "clippy-host"));
        assert!(selects("image", "image-run-debug-wrfsbase"));
        assert!(selects("image-run-debug", "image-run-debug-fallback"));
        assert!(!selects("image-run-d", "image-run-debug-fallback"));
        assert!(!selects("clippy", "image-clippy"));
        assert!(!selects("doc-nostd", "doc"));
    }

    #[test]
    fn step_ids_are_unique_and_each_selects_only_itself_or_its_group() {
        let steps = steps(crate::workspace_root(), BareMode::Target);
        let mut ids: Vec<&str> = steps.iter().map(|step| step.id).collect();
        ids.push(BARE_STEP);
        for id in &ids {
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{id}"
            );
            assert_eq!(ids.iter().filter(|other| *other == id).count(), 1, "{id}");
        }
    }

    #[test]
    fn help_lists_every_step() {
        let help = help_text();
        for step in steps(crate::workspace_root(), BareMode::Target) {
            assert!(help.contains(&format!("  {} ", step.id)), "{}", step.id);
        }
        assert!(help.contains(BARE_STEP));
    }
}
