//! What the daemon-driving tests share: a pool in a temporary directory, the `cowsnap`
//! binary run on it, `cowsnap serve` started and stopped, tool checks that fail loudly.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_cowsnap");

/// A pool in a fresh temporary directory, removed when dropped.
pub struct Pool {
    pub dir: PathBuf,
}

impl Pool {
    /// `cowsnap init` in a new directory named after `tag`.
    pub fn new(tag: &str) -> Pool {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cst-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let p = Pool { dir };
        p.ok(&["init"]);
        p
    }

    /// The binary, on this pool, with no crash point set.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("COWSNAP_POOL", &self.dir)
            .env_remove("COWSNAP_CRASH_AT");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns its output.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "cowsnap {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command that must fail; returns its error output.
    pub fn refused(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "cowsnap {args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    /// The NBD URI of a volume on the pool's default socket.
    pub fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    /// `cowsnap serve ARGS`, with `env` added and its error output to `stderr`; returns
    /// once it serves.
    pub fn serve_with(&self, args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Child {
        let mut c = self.cmd();
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c
            .arg("serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with("cowsnap: serving") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            panic!("cowsnap serve did not start");
        }
        child
    }

    /// `cowsnap serve` with no options.
    pub fn serve(&self) -> Child {
        self.serve_with(&[], &[], Stdio::null())
    }

    /// `cowsnap serve` with its error output (warnings) in the file `log`.
    pub fn serve_logging(&self, log: &Path) -> Child {
        self.serve_with(&[], &[], std::fs::File::create(log).unwrap().into())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SIGTERM to a daemon; it must exit 0.
pub fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let st = child.wait().unwrap();
    assert!(st.success(), "cowsnap serve stopped with {st}");
}

/// True under CI (`CI` set, as `.ci/run` does): a missing tool then fails a test.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// True when `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True when every tool is there; under CI a missing tool fails the test, elsewhere it
/// prints a SKIP line.
pub fn require(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<_> = tools.iter().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        !ci(),
        "{test}: required tools missing under CI: {missing:?}"
    );
    eprintln!("SKIP {test}: missing {missing:?} (CI would fail)");
    false
}

/// Runs a command, failing the test with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Fails the test when `cmd` is not on PATH (these tests have no fallback).
pub fn tool(cmd: &str) {
    assert!(have(cmd), "{cmd} is required by this test");
}

/// Fails the test without Debian's python3 and its nbd module (python3-libnbd).
pub fn python_nbd() {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "/usr/bin/python3 with the nbd module (python3-libnbd) is required"
    );
}

/// True when the tests run as root (loop devices, mounts, other users).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A field of /proc/PID/status, in its unit (kB for VmRSS).
pub fn proc_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}
