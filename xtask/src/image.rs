//! `cargo xtask image [--release] [--fs=wrfsbase|fallback|auto] [--cpus]`:
//! build the freestanding image (`image/`) and run it as a plain Linux
//! process.
//!
//! The image is built for `x86_64-unknown-none` with
//! `-C relocation-model=static` (a static ET_EXEC at 0x400000, laid out by
//! `linker/x86_64.ld`). When that target is not installed it is built,
//! freestanding all the same, for the host triple: no start files, no
//! libc, static, non-PIE. `cargo xtask test` builds it in debug and release
//! (fat LTO) and runs each build in both FS-base modes and in CPU mode
//! (`--cpus`: the platform starts no threads, two CPUs join, signals
//! stand in for interrupts).
//!
//! It is built in `image/` of the workspace's target directory
//! ([`target_dir`]).
//!
//! A run passes when the image exits 0 and its last line reads
//! `image: N passed, 0 failed`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use crate::process;

/// How long one image run may take.
const RUN_TIMEOUT: Duration = Duration::from_mins(3);

/// Which target the image is built for.
#[derive(Clone, Copy)]
pub enum ImageTarget {
    /// `x86_64-unknown-none`.
    Bare,
    /// The host triple, freestanding (the bare target is not installed).
    HostFallback,
}

const HOST: &str = "x86_64-unknown-linux-gnu";
const BARE: &str = "x86_64-unknown-none";

impl ImageTarget {
    fn triple(self) -> &'static str {
        match self {
            Self::Bare => BARE,
            Self::HostFallback => HOST,
        }
    }

    fn rustflags(self) -> &'static str {
        match self {
            Self::Bare => "-C relocation-model=static",
            Self::HostFallback => {
                "-C relocation-model=static -C target-feature=+crt-static \
                 -C link-arg=-nostartfiles -C link-arg=-nostdlib \
                 -C link-arg=-static -C link-arg=-no-pie"
            }
        }
    }
}

/// The runs of each build: both FS-base modes, and CPU mode (the FS base
/// as AT_HWCAP2 allows).
pub const RUN_MODES: [&str; 3] = ["wrfsbase", "fallback", "cpus"];

/// The image's arguments for a run mode of [`RUN_MODES`] (or `auto`).
pub fn run_args(mode: &str) -> Vec<String> {
    if mode == "cpus" {
        vec!["--fs=auto".into(), "--cpus".into()]
    } else {
        vec![format!("--fs={mode}")]
    }
}

/// The `cargo build` command for the image.
pub fn build_command(root: &Path, target: ImageTarget, release: bool) -> Command {
    let mut c = crate::gate::cargo(
        root,
        &[
            "build",
            "--manifest-path",
            "image/Cargo.toml",
            "--target",
            target.triple(),
        ],
    );
    if release {
        c.arg("--release");
    }
    c.env("RUSTFLAGS", target.rustflags())
        .env("CARGO_TARGET_DIR", target_dir());
    c
}

/// `cargo clippy` on the image, with the build's flags (so the two share
/// their build cache) and `-D warnings`.
pub fn clippy_command(root: &Path, target: ImageTarget) -> Command {
    let mut c = crate::gate::cargo(
        root,
        &[
            "clippy",
            "--manifest-path",
            "image/Cargo.toml",
            "--target",
            target.triple(),
            "--",
            "-D",
            "warnings",
        ],
    );
    c.env("RUSTFLAGS", target.rustflags())
        .env("CARGO_TARGET_DIR", target_dir());
    c
}

/// The image's target directory: `image/` in the workspace's (see
/// [`crate::target_dir`]). `image/` is a workspace of its own, so cargo
/// would otherwise use `image/target` or, with `CARGO_TARGET_DIR` set, the
/// main workspace's directory itself; this way the image has one place,
/// which follows `CARGO_TARGET_DIR` and which `cargo clean` empties.
pub fn target_dir() -> PathBuf {
    crate::target_dir().join("image")
}

/// Where the build puts the image.
pub fn binary(target: ImageTarget, release: bool) -> PathBuf {
    let profile = if release { "release" } else { "debug" };
    target_dir()
        .join(target.triple())
        .join(profile)
        .join("gokernel-image")
}

/// Checks the ELF header: a static executable (ET_EXEC) for x86_64.
pub fn check_elf(path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let e_type = bytes.get(16..18).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let e_machine = bytes.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]));
    if bytes.get(..4) != Some(b"\x7fELF") || e_type != Some(2) || e_machine != Some(62) {
        return Err(format!(
            "{} is not a static x86_64 executable (ET_EXEC): e_type {e_type:?}, e_machine {e_machine:?}",
            path.display()
        ));
    }
    Ok(())
}

/// True if the running kernel lets user space use `wrfsbase`
/// (`AT_HWCAP2` bit 1 in /proc/self/auxv).
pub fn wrfsbase_allowed() -> bool {
    const AT_HWCAP2: u64 = 26;
    let Ok(auxv) = std::fs::read("/proc/self/auxv") else {
        return false;
    };
    auxv.chunks_exact(16).any(|pair| {
        let key = u64::from_le_bytes(pair[..8].try_into().unwrap());
        let val = u64::from_le_bytes(pair[8..].try_into().unwrap());
        key == AT_HWCAP2 && val & 2 != 0
    })
}

/// Runs the image in run mode `fs` (see [`run_args`]); true if it passed.
/// A `wrfsbase` run on a kernel that does not allow it is skipped, saying
/// so.
pub fn run_image(path: &Path, fs: &str) -> bool {
    if let Err(e) = check_elf(path) {
        println!("{e}");
        return false;
    }
    if fs == "wrfsbase" && !wrfsbase_allowed() {
        println!(
            "SKIPPED: this kernel does not allow user-mode FSGSBASE (AT_HWCAP2 bit 1 clear); \
             wrfsbase would raise #UD. The fallback mode still runs."
        );
        return true;
    }
    let mut c = Command::new(path);
    c.args(run_args(fs));
    match process::output(&mut c, RUN_TIMEOUT) {
        Ok((status, out)) => {
            print!("{out}");
            let last = out.lines().last().unwrap_or_default();
            let verdict = last.starts_with("image: ") && last.ends_with(" passed, 0 failed");
            if !status.success() || !verdict {
                println!("the image failed: {status}, last line {last:?}");
                return false;
            }
            true
        }
        Err(failure) => {
            println!("the image {failure}");
            false
        }
    }
}

/// `cargo xtask image`.
pub fn run(args: &[String]) -> ExitCode {
    let root = crate::workspace_root();
    let mut release = false;
    let mut modes: Vec<&str> = RUN_MODES.to_vec();
    for a in args {
        match a.as_str() {
            "--release" => release = true,
            "--fs=wrfsbase" => modes = vec!["wrfsbase"],
            "--fs=fallback" => modes = vec!["fallback"],
            "--fs=auto" => modes = vec!["auto"],
            "--cpus" => modes = vec!["cpus"],
            other => return crate::usage_error("image", &format!("unexpected argument `{other}`")),
        }
    }
    let target = match crate::gate::ensure_bare_target(root) {
        crate::gate::BareMode::Target => ImageTarget::Bare,
        crate::gate::BareMode::HostFallback => ImageTarget::HostFallback,
    };
    let mut build = build_command(root, target, release);
    match process::run(&mut build, Duration::from_mins(10)) {
        Ok(s) if s.success() => {}
        _ => return ExitCode::FAILURE,
    }
    let path = binary(target, release);
    let ok = modes.iter().all(|fs| run_image(&path, fs));
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
