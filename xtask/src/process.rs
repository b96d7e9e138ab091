//! Running external programs for the xtask commands.
//!
//! Every command is echoed as `$ <command line>` (with any environment it
//! sets) before it starts, inherits the environment and the terminal, and
//! has a timeout. [`run`] streams the command's output; [`output`] captures
//! its stdout and streams its stderr.
//!
//! On timeout the command is killed together with every process it started:
//! killing `cargo` alone would leave its `rustc` or test binaries running.
//! The process tree is read from `/proc` (Linux); where there is no `/proc`,
//! only the command itself is killed. The command stays in xtask's process
//! group, so Ctrl-C at a terminal stops it along with xtask.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::iter;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How often a running command is polled for exit.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Why a command did not produce an exit status.
#[derive(Debug)]
pub enum Failure {
    /// It could not be started (e.g. the program is not installed).
    Spawn(io::Error),
    /// Waiting for it, or reading its output, failed.
    Wait(io::Error),
    /// It ran longer than its timeout and was killed.
    TimedOut(Duration),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Spawn(error) => write!(f, "could not start: {error}"),
            Failure::Wait(error) => write!(f, "could not wait for it: {error}"),
            Failure::TimedOut(timeout) => {
                write!(f, "timed out after {}s and was killed", timeout.as_secs())
            }
        }
    }
}

/// Echoes `command`, runs it with its output streamed, and returns its exit
/// status.
pub fn run(command: &mut Command, timeout: Duration) -> Result<ExitStatus, Failure> {
    echo(command);
    let mut child = command.spawn().map_err(Failure::Spawn)?;
    wait(&mut child, timeout)
}

/// Echoes `command`, runs it with its stdout captured (stderr streamed), and
/// returns its exit status and stdout.
pub fn output(command: &mut Command, timeout: Duration) -> Result<(ExitStatus, String), Failure> {
    echo(command);
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .map_err(Failure::Spawn)?;
    let mut stdout = child.stdout.take().expect("stdout was piped");
    // Read on another thread so a command that fills the pipe cannot block
    // before it exits.
    let reader = thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).map(|_| text)
    });
    let status = wait(&mut child, timeout)?;
    let text = reader
        .join()
        .expect("the stdout reader does not panic")
        .map_err(Failure::Wait)?;
    Ok((status, text))
}

/// Echoes `command`, runs it with its stdout both streamed line by line
/// and captured, and returns its exit status (or why there is none) with
/// the stdout it wrote — also when it timed out, so the caller can say
/// where it stopped.
pub fn tee(command: &mut Command, timeout: Duration) -> (Result<ExitStatus, Failure>, String) {
    echo(command);
    let mut child = match command.stdout(Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(error) => return (Err(Failure::Spawn(error)), String::new()),
    };
    let stdout = child.stdout.take().expect("stdout was piped");
    let reader = thread::spawn(move || {
        let mut text = String::new();
        for line in io::BufRead::lines(io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            // A serial console ends lines with "\r\n".
            let line = line.trim_end_matches('\r');
            println!("{line}");
            text.push_str(line);
            text.push('\n');
        }
        text
    });
    let status = wait(&mut child, timeout);
    let text = reader.join().expect("the stdout reader does not panic");
    (status, text)
}

/// Prints `$ ` and the command line (see [`command_line`]).
fn echo(command: &Command) {
    println!("$ {}", command_line(command));
}

/// The command line of `command` as [`run`] echoes it: the environment it
/// sets, the program and the arguments, quoted for a POSIX shell.
pub fn command_line(command: &Command) -> String {
    let env = command
        .get_envs()
        .filter_map(|(key, value)| Some(format!("{}={}", key.display(), quote(value?))));
    let words = iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| quote(word).into_owned());
    let line: Vec<String> = env.chain(words).collect();
    line.join(" ")
}

/// `word` as a POSIX shell would need it written: as is if it is made only
/// of characters the shell does not treat specially, else single-quoted.
fn quote(word: &OsStr) -> Cow<'_, str> {
    let text = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text
    } else {
        Cow::Owned(format!("'{}'", text.replace('\'', r"'\''")))
    }
}

/// Waits for `child` to exit, or kills it and everything it started once
/// `timeout` has passed.
fn wait(child: &mut Child, timeout: Duration) -> Result<ExitStatus, Failure> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(Failure::Wait)? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            kill_tree(child);
            return Err(Failure::TimedOut(timeout));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Kills `child` and all of its descendants with SIGKILL, then reaps it.
///
/// The descendants are found first and killed before `child`, while their
/// parent links still lead back to it.
fn kill_tree(child: &mut Child) {
    let descendants = descendants(child.id());
    println!(
        "timeout: killing process {} and {} process(es) it started",
        child.id(),
        descendants.len()
    );
    if !descendants.is_empty() {
        let killed = Command::new("kill")
            .arg("-KILL")
            .args(descendants.iter().map(u32::to_string))
            .stderr(Stdio::null())
            .status();
        if let Err(error) = killed {
            println!("timeout: could not run `kill`: {error}");
        }
    }
    // Errors here mean the child has already exited and been reaped.
    let _ = child.kill();
    let _ = child.wait();
}

/// The ids of every live process descended from `root`, read from `/proc`
/// (empty where there is none).
fn descendants(root: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parent_pid(&stat)?))
        })
        .collect();
    let mut found = Vec::new();
    let mut pending = vec![root];
    while let Some(parent) = pending.pop() {
        for &(pid, ppid) in &parents {
            if ppid == parent {
                found.push(pid);
                pending.push(pid);
            }
        }
    }
    found
}

/// The parent pid from the text of `/proc/<pid>/stat`:
/// `pid (comm) state ppid …`, where `comm` may hold spaces and parentheses.
fn parent_pid(stat: &str) -> Option<u32> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}
