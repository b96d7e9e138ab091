//! External programs the xtask commands need beyond the Rust toolchain, and
//! their set-up.
//!
//! `cargo xtask test` must do its own set-up on a fresh machine, so a
//! missing tool is installed when that can be done without asking: as root
//! on a Debian-like system, with `apt-get install -y`, said out loud.
//! Otherwise the step fails naming the tool and how to install it; it never
//! reports a missing tool as a failed check of the code.
//!
//! The toolchain's own parts are handled elsewhere: `rust-toolchain.toml`
//! names the `clippy` and `rustfmt` components, which rustup installs with
//! the toolchain, and the gate adds the bare target itself
//! ([`crate::gate::ensure_bare_target`]).

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process;

/// An external program and the Debian package that provides it.
pub struct Tool {
    /// The program, as looked up in `PATH`.
    pub program: &'static str,
    /// The Debian/Ubuntu package that installs it.
    pub package: &'static str,
    /// What xtask uses it for, for the messages.
    pub used_for: &'static str,
}

/// Valgrind: callgrind for the instruction counts, memcheck for
/// `cargo xtask valgrind`.
pub const VALGRIND: Tool = Tool {
    program: "valgrind",
    package: "valgrind",
    used_for: "instruction counts (callgrind) and `cargo xtask valgrind` (memcheck)",
};

/// QEMU's x86_64 system emulator: `cargo xtask qemu` boots the reference
/// kernel in it.
pub const QEMU: Tool = Tool {
    program: "qemu-system-x86_64",
    package: "qemu-system-x86",
    used_for: "booting the reference kernel (`cargo xtask qemu`)",
};

/// How long installing a package may take.
const INSTALL_TIMEOUT: Duration = Duration::from_mins(10);

/// Makes sure `tool` can be run, installing it if this process can (root,
/// `apt-get` present). On failure, returns the message to print: which tool
/// is missing, what for, and how to install it.
pub fn ensure(tool: &Tool) -> Result<(), String> {
    ensure_as(tool, is_root() && runs_path("apt-get"), runs)
}

/// [`ensure`] for a program without a `--version` that exits 0 (`wrk`):
/// it counts as there when it is an executable file on the `PATH`.
pub fn ensure_on_path(tool: &Tool) -> Result<(), String> {
    ensure_as(tool, is_root() && runs_path("apt-get"), runs_path)
}

/// [`ensure`], installing with apt-get only if `can_install`; `runs`
/// tells whether the program is there.
fn ensure_as(tool: &Tool, can_install: bool, runs: fn(&str) -> bool) -> Result<(), String> {
    if runs(tool.program) {
        return Ok(());
    }
    let missing = format!(
        "`{}` is not installed (needed for {})",
        tool.program, tool.used_for
    );
    let by_hand = format!(
        "install it and re-run, e.g. `sudo apt-get install {}` (Debian, Ubuntu), \
         `sudo dnf install {}` (Fedora) or your system's package manager",
        tool.package, tool.program
    );
    if !can_install {
        return Err(format!("{missing}; {by_hand}"));
    }
    println!(
        "{missing}: installing the `{}` package as root with apt-get",
        tool.package
    );
    // Quietly non-interactive; a stale package index is refreshed once.
    let install = || {
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "--no-install-recommends", tool.package])
            .env("DEBIAN_FRONTEND", "noninteractive");
        matches!(process::run(&mut c, INSTALL_TIMEOUT), Ok(s) if s.success())
    };
    let installed = install() || {
        let mut update = Command::new("apt-get");
        update.arg("update");
        matches!(process::run(&mut update, INSTALL_TIMEOUT), Ok(s) if s.success()) && install()
    };
    if !installed {
        Err(format!(
            "{missing}, and `apt-get install {}` failed; {by_hand}",
            tool.package
        ))
    } else if !runs(tool.program) {
        Err(format!(
            "{missing}, and still cannot be run after `apt-get install {}` (is it on PATH?); \
             {by_hand}",
            tool.package
        ))
    } else {
        println!("installed `{}`", tool.program);
        Ok(())
    }
}

/// True if `program --version` can be started and exits 0.
fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True if `program` is an executable file in some directory of `PATH`
/// (for programs without a harmless `--version`).
fn runs_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program)))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// True if this process runs as root: its effective uid (the third field of
/// `Uid:` in /proc/self/status) is 0.
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_is_named_with_how_to_install_it() {
        let tool = Tool {
            program: "gokernel-no-such-tool",
            package: "gokernel-no-such-package",
            used_for: "this test",
        };
        let message = ensure_as(&tool, false, runs).unwrap_err();
        assert!(
            message.contains("`gokernel-no-such-tool` is not installed"),
            "{message}"
        );
        assert!(
            message.contains("apt-get install gokernel-no-such-package"),
            "{message}"
        );
    }
}
