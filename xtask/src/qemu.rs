//! `cargo xtask qemu [--cpus N]... [--kvm] [--timeout S] [--release]
//! [--count]`: build the reference kernel (`kernel/`) and boot it under
//! `qemu-system-x86_64`.
//!
//! The kernel is built for `x86_64-unknown-none` (soft-float, no red
//! zone: its interrupt handlers run on the interrupted stack) with
//! `-C relocation-model=static`, in `kernel/` of the target directory.
//! There is no host-triple fallback, as there is for the image: the host
//! triple's SSE code and red zone are wrong in ring 0 without more set-up.
//!
//! Each boot is `qemu-system-x86_64 -kernel <elf>` (PVH: the ELF's Xen
//! note names its 32-bit entry) on a q35 machine with 1 GiB, TCG and
//! `-cpu max` by default (`--kvm`: `-enable-kvm -cpu host`),
//! `-serial stdio` for the console and `-device isa-debug-exit` for the
//! status, killed after the timeout. The kernel prints one line per
//! scenario (`ok`, `FAIL`, `skip`) and a last line
//! `kernel: N passed, M failed`, and writes 0x10 to the exit device on
//! success (QEMU exits with 33). A boot passes when both say so. By
//! default it boots on 1, 2 and 4 CPUs; `--cpus N` (repeatable) picks.
//!
//! `--count` only counts the embedder's cost: the lines of the kernel that
//! exist because of gokernel, marked `// glue: begin` … `// glue: end`
//! (code lines: not blank, not comments). `cargo xtask test` holds them to
//! [`GLUE_LIMIT`].

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use crate::{process, tools};

/// The CPU counts a run boots with by default.
pub const DEFAULT_CPUS: [usize; 3] = [1, 2, 4];

/// How long one boot may take by default (TCG on a loaded 2-core machine
/// is slow; a boot takes about 10 s alone).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_mins(4);

/// Most lines of gokernel-specific code the reference kernel may have.
pub const GLUE_LIMIT: usize = 150;

/// The exit status QEMU reports when the kernel wrote 0x10 to
/// isa-debug-exit: (0x10 << 1) | 1.
const QEMU_PASS: i32 = 33;

const BARE: &str = "x86_64-unknown-none";

/// The kernel's target directory: `kernel/` in the workspace's.
pub fn target_dir() -> PathBuf {
    crate::target_dir().join("kernel")
}

/// Where the build puts the kernel.
pub fn binary(release: bool) -> PathBuf {
    let profile = if release { "release" } else { "debug" };
    target_dir()
        .join(BARE)
        .join(profile)
        .join("gokernel-kernel")
}

/// A cargo command on the kernel's manifest with its target and flags.
fn kernel_cargo(root: &Path, args: &[&str]) -> Command {
    let mut c = crate::gate::cargo(root, args);
    c.args(["--manifest-path", "kernel/Cargo.toml", "--target", BARE])
        .env("RUSTFLAGS", "-C relocation-model=static")
        .env("CARGO_TARGET_DIR", target_dir());
    c
}

/// The `cargo build` command for the kernel.
pub fn build_command(root: &Path, release: bool) -> Command {
    let mut c = kernel_cargo(root, &["build"]);
    if release {
        c.arg("--release");
    }
    c
}

/// `cargo clippy` on the kernel with `-D warnings`.
pub fn clippy_command(root: &Path) -> Command {
    let mut c = kernel_cargo(root, &["clippy"]);
    c.args(["--", "-D", "warnings"]);
    c
}

/// How to boot.
#[derive(Clone, Copy)]
pub struct Boot {
    pub cpus: usize,
    pub kvm: bool,
    pub timeout: Duration,
}

/// The QEMU command line for `kernel`.
pub fn qemu_command(kernel: &Path, boot: Boot) -> Command {
    let mut c = Command::new(tools::QEMU.program);
    c.args(["-machine", "q35", "-m", "1G", "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .args(["-smp", &boot.cpus.to_string()]);
    if boot.kvm {
        c.args(["-enable-kvm", "-cpu", "host"]);
    } else {
        c.args(["-accel", "tcg", "-cpu", "max"]);
    }
    c.arg("-kernel").arg(kernel);
    c
}

/// Boots `kernel` once; true if every scenario passed. Prints the
/// console as it comes and a one-line verdict.
pub fn boot(kernel: &Path, boot: Boot) -> bool {
    let start = Instant::now();
    let (status, out) = process::tee(&mut qemu_command(kernel, boot), boot.timeout);
    let secs = start.elapsed().as_secs_f64();
    let last = out.lines().last().unwrap_or_default();
    let summary = last.strip_prefix("kernel: ");
    let verdict = match &status {
        Ok(s)
            if s.code() == Some(QEMU_PASS) && summary.is_some_and(|s| s.ends_with(" 0 failed")) =>
        {
            Ok(())
        }
        Ok(s) => Err(format!(
            "QEMU exited with {s} (33 is a pass); last line {last:?}"
        )),
        Err(failure) => Err(format!("QEMU {failure}; last line {last:?}")),
    };
    let [ok, fail, skip] =
        ["ok ", "FAIL ", "skip "].map(|p| out.lines().filter(|l| l.starts_with(p)).count());
    match verdict {
        Ok(()) => {
            println!(
                "qemu, {} CPU(s): PASS in {secs:.1}s ({ok} scenarios passed, {skip} skipped)",
                boot.cpus
            );
            true
        }
        Err(why) => {
            println!(
                "qemu, {} CPU(s): FAIL in {secs:.1}s ({ok} passed, {fail} failed, {skip} skipped): {why}",
                boot.cpus
            );
            false
        }
    }
}

/// Installs QEMU if it is missing and can be, then boots `kernel` on each
/// of `cpus`; true if every boot passed.
pub fn boot_all(kernel: &Path, cpus: &[usize], kvm: bool, timeout: Duration) -> bool {
    if let Err(missing) = tools::ensure(&tools::QEMU) {
        println!("{missing}");
        return false;
    }
    if !kernel.exists() {
        println!("{} is not built", kernel.display());
        return false;
    }
    let results: Vec<(usize, bool)> = cpus
        .iter()
        .map(|&n| {
            (
                n,
                boot(
                    kernel,
                    Boot {
                        cpus: n,
                        kvm,
                        timeout,
                    },
                ),
            )
        })
        .collect();
    let line: Vec<String> = results
        .iter()
        .map(|(n, ok)| format!("{n} CPU(s) {}", if *ok { "PASS" } else { "FAIL" }))
        .collect();
    println!("qemu summary: {}", line.join(", "));
    results.iter().all(|r| r.1)
}

/// The embedder's cost: code lines between `// glue: begin` and
/// `// glue: end` in `kernel/src/*.rs`, per file.
pub fn count_glue(root: &Path) -> Result<Vec<(String, usize)>, String> {
    let dir = root.join("kernel/src");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    let mut counts = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let n = count_marked(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if n > 0 {
            counts.push((path.file_name().unwrap().to_string_lossy().into_owned(), n));
        }
    }
    Ok(counts)
}

/// Code lines (not blank, not `//` comments) between the glue markers of
/// one file; an error for an unclosed or nested marker.
fn count_marked(text: &str) -> Result<usize, String> {
    let (mut inside, mut n) = (false, 0);
    for (i, line) in text.lines().enumerate() {
        match line.trim() {
            "// glue: begin" if !inside => inside = true,
            "// glue: end" if inside => inside = false,
            "// glue: begin" | "// glue: end" => {
                return Err(format!("line {}: unbalanced glue marker", i + 1));
            }
            l if inside && !l.is_empty() && !l.starts_with("//") => n += 1,
            _ => {}
        }
    }
    if inside {
        return Err("a `// glue: begin` without its end".into());
    }
    Ok(n)
}

/// Prints the glue count; true if it is within [`GLUE_LIMIT`].
pub fn check_glue(root: &Path) -> bool {
    match count_glue(root) {
        Ok(counts) => {
            let total: usize = counts.iter().map(|c| c.1).sum();
            let parts: Vec<String> = counts.iter().map(|(f, n)| format!("{f} {n}")).collect();
            let ok = total <= GLUE_LIMIT;
            println!(
                "the reference kernel's gokernel-specific code: {total} lines ({}); limit {GLUE_LIMIT}: {}",
                parts.join(", "),
                if ok { "PASS" } else { "FAIL" }
            );
            ok
        }
        Err(e) => {
            println!("{e}");
            false
        }
    }
}

const USAGE: &str = "[--cpus N]... [--kvm] [--timeout SECONDS] [--release] [--count]";

/// `cargo xtask qemu`.
pub fn run(args: &[String]) -> ExitCode {
    let root = crate::workspace_root();
    let (mut cpus, mut kvm, mut release, mut timeout) = (Vec::new(), false, false, DEFAULT_TIMEOUT);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<u64, ExitCode> {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| {
                    crate::usage_error(
                        "qemu",
                        &format!("`{name}` needs a positive number ({USAGE})"),
                    )
                })
        };
        match arg.as_str() {
            "--cpus" => match value("--cpus") {
                Ok(n) if n <= 16 => cpus.push(n as usize),
                Ok(_) => return crate::usage_error("qemu", "the kernel runs on at most 16 CPUs"),
                Err(e) => return e,
            },
            "--timeout" => match value("--timeout") {
                Ok(s) => timeout = Duration::from_secs(s),
                Err(e) => return e,
            },
            "--kvm" => kvm = true,
            "--release" => release = true,
            "--count" => {
                return if check_glue(root) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                };
            }
            other => {
                return crate::usage_error(
                    "qemu",
                    &format!("unknown argument `{other}` ({USAGE})"),
                );
            }
        }
    }
    if cpus.is_empty() {
        cpus = DEFAULT_CPUS.to_vec();
    }
    if let crate::gate::BareMode::HostFallback = crate::gate::ensure_bare_target(root) {
        println!("the kernel needs the {BARE} target (`rustup target add {BARE}`)");
        return ExitCode::FAILURE;
    }
    match process::run(&mut build_command(root, release), Duration::from_mins(10)) {
        Ok(s) if s.success() => {}
        _ => return ExitCode::FAILURE,
    }
    let glue = check_glue(root);
    if boot_all(&binary(release), &cpus, kvm, timeout) && glue {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glue_count_takes_code_lines_between_markers_only() {
        let text = "a\n// glue: begin\nb\n\n// c\n  d\n// glue: end\ne\n";
        assert_eq!(count_marked(text), Ok(2));
        assert!(count_marked("// glue: begin\nx\n").is_err());
        assert!(count_marked("// glue: end\n").is_err());
    }

    #[test]
    fn the_reference_kernel_is_within_the_glue_limit() {
        let counts = count_glue(crate::workspace_root()).unwrap();
        let total: usize = counts.iter().map(|c| c.1).sum();
        assert!(total > 0 && total <= GLUE_LIMIT, "{counts:?}");
    }
}
