//! The Go toolchain for the peer benchmarks (`bench --peers`,
//! `http-bench`): found on the `PATH` or where Debian's `golang-go` puts
//! it, and run offline.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What a table says when no Go toolchain is found.
pub const NO_GO: &str = "Go: not installed (apt-get install golang-go)";

/// A `go` command with the environment of an offline build: no module
/// proxy, no toolchain download, the module file taken as it is.
pub fn go_command(go: &Path) -> Command {
    let mut c = Command::new(go);
    c.env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local")
        .env("GO111MODULE", "on");
    c
}

/// The `go` toolchain: `go` on the `PATH`, else Debian's
/// `/usr/lib/go/bin/go`, else the newest `/usr/lib/go-1.*/bin/go`; with
/// its `go version` line.
pub fn find_go() -> Option<(PathBuf, String)> {
    let mut candidates = vec![PathBuf::from("go"), PathBuf::from("/usr/lib/go/bin/go")];
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let minor = name.strip_prefix("go-1.")?.parse().ok()?;
            Some((minor, e.path().join("bin/go")))
        })
        .collect();
    versioned.sort();
    candidates.extend(versioned.into_iter().rev().map(|(_, p)| p));
    candidates.into_iter().find_map(|go| {
        let o = go_command(&go).arg("version").output().ok()?;
        o.status
            .success()
            .then(|| (go, String::from_utf8_lossy(&o.stdout).trim().to_string()))
    })
}
