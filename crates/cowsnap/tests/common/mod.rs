//! What the daemon-driving tests share: a pool in a temporary directory, the `cowsnap`
//! binary run on it, `cowsnap serve` started and stopped, tool checks that fail loudly.

#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use cowsnap_core::testkit::{ci, have_tool, require_tools, scratch, seed, wait_for, Scratch};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_cowsnap");

/// A pool (`SCRATCH/pool`) in a fresh scratch directory, removed when dropped; tests may
/// put files beside the pool with `dir.with_extension(..)`.
pub struct Pool {
    pub dir: PathBuf,
    _scratch: Scratch,
}

impl Pool {
    /// `cowsnap init` in a new directory named after `tag`.
    pub fn new(tag: &str) -> Pool {
        let scratch = scratch(tag);
        let p = Pool {
            dir: scratch.join("pool"),
            _scratch: scratch,
        };
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

    /// `cowsnap serve ARGS` on this pool, with `env` added; returns once it serves.
    pub fn serve_with(&self, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut c = self.cmd();
        for (k, v) in env {
            c.env(k, v);
        }
        Daemon::spawn(c.arg("serve").args(args))
    }

    /// `cowsnap serve` with no options.
    pub fn serve(&self) -> Daemon {
        self.serve_with(&[], &[])
    }
}

/// A running `cowsnap serve` whose output (stdout and stderr) is collected; stopped with
/// SIGTERM when dropped.
pub struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Spawns `cmd` (a `cowsnap ... serve ...` command) and waits until it serves and has
    /// printed its URIs.
    pub fn spawn(cmd: &mut Command) -> Daemon {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cowsnap serve");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let ready = line.starts_with("cowsnap: serving");
                l2.lock().unwrap().push(line);
                if ready {
                    let _ = tx.send(());
                }
            }
        });
        let err = child.stderr.take().unwrap();
        let l3 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l3.lock().unwrap().push(line);
            }
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            panic!("cowsnap serve did not start: {:?}", lines.lock().unwrap());
        }
        Daemon { child, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// `HOST:PORT` of the first URI printed with `scheme` (`nbds` or `nbd`). The URI lines
    /// follow the "serving" line: waits for the first with `scheme` (a minute at most).
    pub fn host_port(&self, scheme: &str) -> String {
        let prefix = format!("{scheme}://");
        let find = || {
            self.output().iter().find_map(|l| {
                let at = l.find(&prefix)?;
                let rest = &l[at + prefix.len()..];
                Some(rest[..rest.find('/')?].to_string())
            })
        };
        wait_for(&format!("a {prefix} URI printed by cowsnap serve"), || {
            find().is_some()
        });
        find().expect("a URI")
    }

    /// SIGTERM, then waits; returns the exit status and the daemon's output.
    pub fn stop(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let st = self.terminate();
        (st, self.output())
    }

    /// Waits for the daemon to die by itself (a crash point, a SIGKILL); fails the test
    /// if it exits cleanly or lives on for 30 s.
    pub fn wait_crash(mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(!st.success(), "the daemon did not crash: {st}");
                return;
            }
            assert!(Instant::now() < deadline, "the daemon did not crash");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM; the daemon must exit 0.
    pub fn stop_ok(self) {
        let (st, out) = self.stop();
        assert!(st.success(), "cowsnap serve stopped with {st}: {out:?}");
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("cowsnap serve did not stop on SIGTERM: {:?}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
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

/// Fails the test when a tool is missing, CI or not: the tests that call this have no
/// fallback. Tool names as in [`have_tool`] (`python3-nbd` is Debian's python3-libnbd).
pub fn need_tools(tools: &[&str]) {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have_tool(t)).collect();
    assert!(
        missing.is_empty(),
        "required by this test: {missing:?} (apt-get install -y qemu-utils libnbd-bin python3-libnbd)"
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

/// `qemu-io` commands on `target` (an NBD URI or a file), which must all succeed; their
/// output.
pub fn qemu_io(target: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    String::from_utf8_lossy(&run(c.arg(target)).stdout).into_owned()
}

/// A raw copy of an NBD export (or a file) into `to`.
pub fn image_of(from: &str, to: &std::path::Path) {
    let _ = std::fs::remove_file(to);
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        from,
        to.to_str().unwrap(),
    ]));
}

/// True when two raw images (exports or files) hold the same bytes.
pub fn identical(a: &str, b: &str) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw", a, b])
        .status()
        .unwrap()
        .success()
}

/// True when `cowsnap list` shows a volume called `name`.
pub fn has_volume(pool: &Pool, name: &str) -> bool {
    let v: serde_json::Value = serde_json::from_str(&pool.ok(&["list", "--json"])).unwrap();
    v.as_array().unwrap().iter().any(|v| v["name"] == name)
}
