#!/usr/bin/python3
"""cowsnap benchmark harness: cowsnap side by side with qemu-nbd, nbdkit and the local file.

Python 3 standard library only. Every server listens on a unix socket in a temporary
directory and is stopped at the end, also on errors. See docs/performance.md.

    /usr/bin/python3 bench/cowbench.py --quick          # < 3 minutes
    /usr/bin/python3 bench/cowbench.py                  # 1 GiB, full matrix
    /usr/bin/python3 bench/cowbench.py --size 4G --repeat 3
"""

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOT = 64 * 1024  # first-write log: one 4 KiB write per 64 KiB slot (fresh for every chunk size <= 64K)
KIB, MIB, GIB = 1024, 1024 ** 2, 1024 ** 3

TARGETS = ["local", "qemu-raw", "qemu-qcow2", "nbdkit-cow", "cowsnap-origin", "cowsnap-snap"]
JOBS = ["randread-qd1", "randread-qd16", "seqread-1m-qd4", "firstwrite-qd16", "rewrite-qd16", "seqwrite-1m-qd4"]
JOB_TEXT = {
    "randread-qd1": "4K random read, QD1",
    "randread-qd16": "4K random read, QD16",
    "seqread-1m-qd4": "1M sequential read, QD4",
    "firstwrite-qd16": "4K write into never-written chunks, QD16 (replayed log)",
    "rewrite-qd16": "4K rewrite of the same chunks, QD16 (same log again)",
    "seqwrite-1m-qd4": "1M sequential write, QD4 (whole image, one pass)",
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(s):
    s = s.strip().upper()
    mult = {"K": KIB, "M": MIB, "G": GIB, "T": 1024 * GIB}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def human(n):
    for unit, m in (("G", GIB), ("M", MIB), ("K", KIB)):
        if n >= m and n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


def run(cmd, **kw):
    """Run a command, raise with its stderr on failure."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}): {shlex.join(cmd)}\n{r.stderr.strip()}")
    return r.stdout


def out_or(cmd, default="?"):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or default
    except Exception:
        return default


# --------------------------------------------------------------------------------------------
# processes


class Procs:
    """Every process the harness starts; all are stopped in stop_all (try/finally)."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, logpath, env=None, cwd=None):
        f = open(logpath, "ab")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                             start_new_session=True)
        p._logfile = f
        p._cmd = cmd
        self.procs.append(p)
        return p

    def stop(self, p, timeout=20):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{p._cmd[0]} (pid {p.pid}) ignored SIGTERM for {timeout}s: SIGKILL")
                p.kill()
                p.wait()
        p._logfile.close()
        if p in self.procs:
            self.procs.remove(p)
        return p.returncode

    def stop_all(self):
        for p in list(self.procs):
            try:
                self.stop(p)
            except Exception as e:  # keep stopping the others
                log(f"stopping {p.pid}: {e}")


def wait_socket(path, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc._cmd[0]} exited with {proc.returncode} before listening "
                               f"(log: {proc._logfile.name})")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                s.close()
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    raise RuntimeError(f"no listener on {path} after {timeout}s")


def proc_cpu(pid):
    """utime+stime of a process in seconds (None when gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def proc_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """Samples VmRSS of one process (and, optionally, a callback) every `period` seconds."""

    def __init__(self, pid, period=0.5, extra=None, extra_every=4):
        super().__init__(daemon=True)
        self.pid, self.period, self.extra, self.extra_every = pid, period, extra, extra_every
        self.samples = []
        self.label = ""
        self._halt = threading.Event()
        self.t0 = time.time()

    def run(self):
        i = 0
        while not self._halt.is_set():
            rss = proc_rss_kib(self.pid)
            if rss is None:
                break
            s = {"t": round(time.time() - self.t0, 2), "rss_kib": rss, "job": self.label}
            if self.extra and i % self.extra_every == 0:
                try:
                    s.update(self.extra())
                except Exception:
                    pass
            self.samples.append(s)
            i += 1
            self._halt.wait(self.period)

    def stop(self):
        self._halt.set()
        self.join(5)
        return self.samples


# --------------------------------------------------------------------------------------------
# fio


def drop_caches(ctx):
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        if not ctx.get("drop_warned"):
            log(f"cannot drop the page cache ({e}); read numbers may be cache-hot")
            ctx["drop_warned"] = True
        return False


def write_log(path, offsets, nbytes, pad_reads):
    """fio iolog v2: each offset written once, in the given order, then `pad_reads` 4K reads.

    The trailing reads are padding: fio 3.33 replaying a log through its nbd engine closes the
    connection while the last ~iodepth requests are in flight, so without them the last writes
    are neither waited for nor counted. The padding reads absorb that; the harness checks that
    every write of the log completed (write io_bytes == writes * 4K).
    """
    with open(path, "w") as f:
        f.write("fio version 2 iolog\ndev add\ndev open\n")
        for off in offsets:
            f.write(f"dev write {off} {nbytes}\n")
        for i in range(pad_reads):
            f.write(f"dev read {i * 4096} 4096\n")
        f.write("dev close\n")


def fio_cmd(target_io, job, name, opts):
    """target_io: dict of fio options choosing the engine and the device."""
    cmd = ["fio", f"--name={name}", "--output-format=json"]
    for k, v in list(target_io.items()) + list(job.items()) + list(opts.items()):
        cmd.append(f"--{k}" if v is None else f"--{k}={v}")
    return cmd


def parse_fio(stdout):
    i = stdout.find("\n{")
    text = stdout if stdout.startswith("{") else stdout[i + 1:]
    return json.loads(text)


def pct(d, key):
    p = (d.get("clat_ns") or {}).get("percentile") or {}
    v = p.get(key)
    return None if v is None else v / 1000.0  # µs


def summarize_fio(j, ddir):
    job = j["jobs"][0]
    d = job[ddir]
    return {
        "iops": d["iops"],
        "mib_s": d["bw_bytes"] / MIB,
        "io_bytes": d["io_bytes"],
        "total_ios": d["total_ios"],
        "runtime_ms": d["runtime"],
        "clat_mean_us": d["clat_ns"]["mean"] / 1000.0,
        "p50_us": pct(d, "50.000000"),
        "p99_us": pct(d, "99.000000"),
        "p99_9_us": pct(d, "99.900000"),
        "max_us": d["clat_ns"]["max"] / 1000.0,
        "depth_levels": job.get("iodepth_level"),
        "error": job.get("error", 0),
        "usr_cpu": job.get("usr_cpu"),
        "sys_cpu": job.get("sys_cpu"),
    }


class Runner:
    def __init__(self, args, work, ctx):
        self.args, self.work, self.ctx = args, work, ctx
        self.commands = []  # every command line, in order

    def note_cmd(self, cmd, env_prefix=""):
        self.commands.append(env_prefix + shlex.join(cmd))

    def fio(self, target_io, jobname, job, server_pid=None, expect_writes=None):
        cmd = fio_cmd(target_io, job, jobname, {})
        self.note_cmd(cmd)
        cpu0 = proc_cpu(server_pid) if server_pid else None
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=self.args.fio_timeout)
        wall = time.time() - t0
        cpu1 = proc_cpu(server_pid) if server_pid else None
        if r.returncode != 0:
            raise RuntimeError(f"fio failed ({r.returncode}): {shlex.join(cmd)}\n{r.stderr[-2000:]}\n{r.stdout[-2000:]}")
        j = parse_fio(r.stdout)
        ddir = "write" if job.get("rw", "").endswith("write") or "read_iolog" in job else "read"
        s = summarize_fio(j, ddir)
        s["wall_s"] = round(wall, 3)
        if cpu0 is not None and cpu1 is not None:
            s["server_cpu_s"] = round(cpu1 - cpu0, 3)
            ios = s["total_ios"] or 1
            s["server_cpu_us_per_io"] = round((cpu1 - cpu0) * 1e6 / ios, 2)
        if expect_writes is not None:
            done = s["io_bytes"] // 4096
            s["log_writes"] = expect_writes
            s["log_complete"] = done == expect_writes
            if done != expect_writes:
                s["log_note"] = f"only {done} of {expect_writes} logged writes completed"
        if s["error"]:
            raise RuntimeError(f"fio reported error {s['error']}: {shlex.join(cmd)}")
        return s


# --------------------------------------------------------------------------------------------
# servers


class Server:
    """Base: start() returns fio options for the target; stop() stops what it started."""

    name = "?"
    proc = None

    def __init__(self, h):
        self.h = h  # the Harness

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self):
        return self.proc is None or self.proc.poll() is None

    def stop(self):
        if self.proc:
            rc = self.h.procs.stop(self.proc)
            self.proc = None
            return rc
        return None


class LocalFile(Server):
    name = "local"

    def start(self):
        return {"ioengine": "io_uring", "direct": 1, "filename": self.h.image}

    def log_opts(self):
        return {"replay_redirect": self.h.image}


class QemuNbd(Server):
    def __init__(self, h, qcow2):
        super().__init__(h)
        self.qcow2 = qcow2
        self.name = "qemu-qcow2" if qcow2 else "qemu-raw"

    def start(self):
        h = self.h
        sock = os.path.join(h.work, f"{self.name}.sock")
        if self.qcow2:
            img = os.path.join(h.work, "overlay.qcow2")
            if os.path.exists(img):
                os.unlink(img)
            cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", h.image, "-F", "raw", img]
            h.runner.note_cmd(cmd)
            run(cmd)
            fmt = "qcow2"
        else:
            img, fmt = h.image, "raw"
        cmd = ["qemu-nbd", "-f", fmt, "--cache=none", f"--aio={h.qemu_aio}", "-t", "-k", sock,
               "-x", "disk", img]
        h.runner.note_cmd(cmd)
        self.proc = h.procs.start(cmd, os.path.join(h.work, f"{self.name}.log"))
        wait_socket(sock, self.proc)
        return {"ioengine": "nbd", "uri": f"nbd+unix:///disk?socket={sock}"}


class NbdkitCow(Server):
    name = "nbdkit-cow"

    def start(self):
        h = self.h
        sock = os.path.join(h.work, "nbdkit.sock")
        tmp = os.path.join(h.work, "nbdkit-tmp")
        os.makedirs(tmp, exist_ok=True)
        cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", sock, "--filter=cow", "file", h.image,
               "cache=none"]
        if h.args.nbdkit_cow_block:
            cmd.append(f"cow-block-size={h.args.nbdkit_cow_block}")
        if os.path.exists(sock):
            os.unlink(sock)  # left behind by an nbdkit that aborted
        env = dict(os.environ, TMPDIR=tmp)
        h.runner.note_cmd(cmd, f"TMPDIR={tmp} ")
        self.proc = h.procs.start(cmd, os.path.join(h.work, "nbdkit.log"), env=env)
        wait_socket(sock, self.proc)
        return {"ioengine": "nbd", "uri": f"nbd+unix:///?socket={sock}"}


class Cowsnap(Server):
    """cowsnap serve on the pool; `export` is the origin or the snapshot's name."""

    def __init__(self, h, export, snapshots=1, chunk=4096, name=None):
        super().__init__(h)
        self.export, self.snapshots, self.chunk = export, snapshots, chunk
        self.name = name or ("cowsnap-origin" if export == "origin" else "cowsnap-snap")

    def start(self):
        h = self.h
        h.set_snapshots(self.snapshots, self.chunk)
        sock = os.path.join(h.work, "cowsnap.sock")
        cmd = [h.cowsnap, "--pool", h.pool, "serve", "--listen", f"unix:{sock}"]
        if h.direct:
            cmd.append("--direct")
        cmd += h.args.cowsnap_arg
        h.runner.note_cmd(cmd)
        self.proc = h.procs.start(cmd, os.path.join(h.work, "cowsnap.log"))
        wait_socket(sock, self.proc)
        export = "base" if self.export == "origin" else "snap0"
        return {"ioengine": "nbd", "uri": f"nbd+unix:///{export}?socket={sock}"}

    def stop(self):
        rc = super().stop()
        if rc not in (None, 0):
            raise RuntimeError(f"cowsnap serve exited with {rc} (log {os.path.join(self.h.work, 'cowsnap.log')})")
        return rc


# --------------------------------------------------------------------------------------------
# the harness


class Harness:
    def __init__(self, args):
        self.args = args
        self.procs = Procs()
        self.results = {}
        self.work = None

    # ---- setup
    def setup(self):
        a = self.args
        self.work = tempfile.mkdtemp(prefix="cowsnap-bench-", dir=a.workdir)
        self.ctx = {}
        self.runner = Runner(a, self.work, self.ctx)
        self.pool = os.path.join(self.work, "pool")
        self.image = os.path.join(self.pool, "base.img")
        self.cowsnap = self.build()
        help_text = out_or([self.cowsnap, "serve", "--help"], "")
        self.direct = "--direct" in help_text and not a.no_direct
        if "--direct" not in help_text:
            log("cowsnap serve has no --direct: cowsnap runs through the page cache (noted in the results)")
        qhelp = out_or(["qemu-nbd", "--help"], "")
        self.qemu_aio = "io_uring" if "io_uring" in qhelp else "native"
        cmd = [self.cowsnap, "--pool", self.pool, "init"]
        self.runner.note_cmd(cmd)
        run(cmd)
        cmd = [self.cowsnap, "--pool", self.pool, "origin", "create", "base", "--size", str(a.size)]
        self.runner.note_cmd(cmd)
        run(cmd)
        t0 = time.time()
        cmd = ["fio", "--name=fill", f"--filename={self.image}", "--rw=write", "--bs=1M", "--iodepth=8",
               "--ioengine=io_uring", "--direct=1", f"--size={a.size}", "--refill_buffers=1",
               "--output-format=terse"]
        self.runner.note_cmd(cmd)
        run(cmd)
        log(f"origin {human(a.size)} filled with random data in {time.time() - t0:.1f}s ({self.image})")
        self.snapshots_now = []
        # logs: one 4 KiB write per 64 KiB slot, seeded random order
        slots = list(range(a.size // SLOT))
        random.Random(a.seed).shuffle(slots)
        self.first_log = os.path.join(self.work, "firstwrite.iolog")
        write_log(self.first_log, [s * SLOT for s in slots], 4096, pad_reads=256)
        self.first_log_writes = len(slots)

    def build(self):
        a = self.args
        target_dir = a.target_dir or os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
        binary = os.path.join(target_dir, "release", "cowsnap")
        if not a.no_build:
            cmd = ["cargo", "build", "--release", "-p", "cowsnap"]
            log("building: " + shlex.join(cmd) + f" (CARGO_TARGET_DIR={target_dir})")
            r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, CARGO_TARGET_DIR=target_dir),
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError("cargo build failed:\n" + r.stderr[-3000:])
        if not os.path.exists(binary):
            raise RuntimeError(f"no cowsnap binary at {binary}")
        # Run a copy: a rebuild of the target directory during the run must not change the
        # binary under test halfway through.
        copy = os.path.join(self.work, "cowsnap")
        shutil.copy2(binary, copy)
        log(f"cowsnap binary: {binary} (copied to {copy})")
        return copy

    def set_snapshots(self, n, chunk):
        """Offline (daemon stopped): remove every snapshot, create n fresh ones."""
        a = self.args
        for s in self.snapshots_now:
            cmd = [self.cowsnap, "--pool", self.pool, "snapshot", "remove", s]
            run(cmd)
        self.snapshots_now = []
        # room for every chunk of the origin plus its metadata (sparse file)
        chunks = -(-a.size // chunk)
        meta = -(-chunks // (chunk // 16)) + 2
        cow = (chunks + meta) * chunk
        for i in range(n):
            name = f"snap{i}"
            cmd = [self.cowsnap, "--pool", self.pool, "snapshot", "create", name, "--origin", "base",
                   "--cow-size", str(cow), "--chunk-size", str(chunk)]
            if i == 0:
                self.runner.note_cmd(cmd)
            run(cmd)
            self.snapshots_now.append(name)

    def status(self):
        out = run([self.cowsnap, "--pool", self.pool, "status", "--json"])
        vols = json.loads(out)
        return {"exceptions": sum(v.get("exceptions", 0) for v in vols if v.get("kind") == "snapshot"),
                "invalid": [v["name"] for v in vols if v.get("status") in ("Invalid", "Overflow")]}

    # ---- jobs
    def job_opts(self, job):
        a = self.args
        size = a.size
        base = {"size": size}
        timed = {"runtime": a.runtime, "time_based": None}
        if a.ramp:
            timed["ramp_time"] = a.ramp
        if job == "randread-qd1":
            return dict(base, rw="randread", bs="4k", iodepth=1, norandommap=None, randrepeat=1, **timed)
        if job == "randread-qd16":
            return dict(base, rw="randread", bs="4k", iodepth=16, norandommap=None, randrepeat=1, **timed)
        if job == "seqread-1m-qd4":
            return dict(base, rw="read", bs="1M", iodepth=4, **timed)
        if job in ("firstwrite-qd16", "rewrite-qd16"):
            return {"read_iolog": self.first_log, "replay_no_stall": 1, "iodepth": 16}
        if job == "seqwrite-1m-qd4":
            return dict(base, rw="write", bs="1M", iodepth=4, runtime=max(60, a.runtime * 10))
        raise KeyError(job)

    def run_target(self, server, rep):
        """All jobs against one target; the server is restarted only if it died."""
        res = {}
        io = server.start()
        if server.pid:
            log(f"{server.name}: pid {server.pid}")
        sampler = None
        if isinstance(server, Cowsnap):
            sampler = RssSampler(server.pid, period=0.5)
            sampler.start()
        first_done = False
        try:
            for job in self.args.jobs:
                opts = self.job_opts(job)
                expect = None
                if "read_iolog" in opts:
                    expect = self.first_log_writes
                    if isinstance(server, LocalFile):
                        opts.update(server.log_opts())
                bracket = (job == "seqread-1m-qd4" and not isinstance(server, LocalFile)
                           and "local" in self.args.targets)
                if bracket:
                    # The local limit drifts by tens of percent over minutes on this VM: measure
                    # it again right before and right after this server's run, for a paired ratio.
                    drop_caches(self.ctx)
                    ref = self.runner.fio(LocalFile(self).start(), f"local-before.{server.name}.{job}", opts)
                    res.setdefault("_paired_local", {})[job] = ref
                if job.startswith(("randread", "seqread")):
                    drop_caches(self.ctx)
                if sampler:
                    sampler.label = job
                name = f"{server.name}.{job}"
                for attempt in (1, 2):
                    if not server.alive():
                        io = self.restart(server, job, res, first_done, opts)
                    try:
                        s = self.runner.fio(io, name, opts, server_pid=server.pid, expect_writes=expect)
                        break
                    except RuntimeError:
                        time.sleep(0.5)
                        if attempt == 2 or server.alive() or isinstance(server, Cowsnap):
                            raise  # a cowsnap failure is never papered over
                if "read_iolog" in opts:
                    time.sleep(0.3)  # let a server that aborts on the disconnect do so now
                if job == "firstwrite-qd16":
                    first_done = True
                res[job] = s
                if bracket:
                    drop_caches(self.ctx)
                    after = self.runner.fio(LocalFile(self).start(), f"local-after.{server.name}.{job}", opts)
                    res.setdefault("_paired_local_after", {})[job] = after
                unit = f"{s['mib_s']:.0f} MiB/s" if "1m" in job else f"{s['iops']:.0f} IOPS"
                log(f"  {server.name:15s} {job:16s} {unit:>14s}  p50 {s['p50_us'] or 0:.0f}us p99 {s['p99_us'] or 0:.0f}us"
                    + ("" if s.get("log_complete", True) else "  (" + s["log_note"] + ")"))
            if isinstance(server, Cowsnap):
                st = self.status()
                res["_status"] = st
                if st["invalid"]:
                    res.setdefault("_notes", []).append(f"snapshots not valid after the run: {st['invalid']}")
        finally:
            if sampler:
                samples = sampler.stop()
                res["_rss"] = rss_summary(samples)
            server.stop()
        return res

    def restart(self, server, job, res, first_done, opts):
        """A peer died (nbdkit 1.32 can abort when fio's log replay disconnects)."""
        log(f"{server.name} died (rc {server.proc.returncode}, log {server.proc._logfile.name}); restarting")
        res.setdefault("_notes", []).append(f"server died before {job}; restarted")
        server.stop()
        io = server.start()
        if job == "rewrite-qd16" and first_done:
            # its state is lost: replay the log once untimed so the next run is a true rewrite
            self.runner.fio(io, "warm", opts)
            time.sleep(0.3)
            if not server.alive():
                server.stop()
                io = server.start()
                res["_notes"].append("server died again after the warm-up replay: rewrite-qd16 is a first write")
        return io

    def scaling(self, rep):
        a = self.args
        out = {}
        for chunk in a.chunks:
            for n in a.snapshots:
                if n == 0 and chunk != a.chunks[0]:
                    out[f"{human(chunk)}/0"] = out[f"{human(a.chunks[0])}/0"]
                    continue
                srv = Cowsnap(self, "origin", snapshots=n, chunk=chunk, name=f"scale-{human(chunk)}-{n}")
                io = srv.start()
                try:
                    opts = {"read_iolog": self.first_log, "replay_no_stall": 1, "iodepth": 16,
                            "runtime": a.scale_runtime}
                    s = self.runner.fio(io, f"scale.{human(chunk)}.{n}", opts, server_pid=srv.pid)
                    s["log_writes_done"] = s["io_bytes"] // 4096
                    st = self.status()
                    s["exceptions"] = st["exceptions"]
                    if st["invalid"]:
                        s["note"] = f"invalid snapshots: {st['invalid']}"
                finally:
                    srv.stop()
                out[f"{human(chunk)}/{n}"] = s
                log(f"  scaling chunk {human(chunk):>3s} snapshots {n:2d}: {s['iops']:8.0f} IOPS  "
                    f"p50 {s['p50_us'] or 0:.0f}us p99 {s['p99_us'] or 0:.0f}us  server cpu {s.get('server_cpu_us_per_io', 0)}us/io")
        return out

    def soak(self):
        """Long mixed run on the origin and the snapshot; VmRSS and exception count sampled."""
        a = self.args
        srv = Cowsnap(self, "origin", snapshots=1, chunk=4096, name="soak")
        io = srv.start()
        sampler = RssSampler(srv.pid, period=1.0, extra=self.status, extra_every=2)
        sampler.start()
        try:
            job = {"rw": "randrw", "rwmixread": 50, "bs": "4k", "iodepth": 16, "size": a.size,
                   "norandommap": None, "runtime": a.soak, "time_based": None, "randrepeat": 1}
            s = self.runner.fio(io, "soak", job, server_pid=srv.pid)
        finally:
            samples = sampler.stop()
            srv.stop()
        r = rss_summary(samples)
        r["fio_write_iops"] = s["iops"]
        return r

    def main(self):
        a = self.args
        reps = []
        try:
            self.setup()
            servers = {
                "local": lambda: LocalFile(self),
                "qemu-raw": lambda: QemuNbd(self, False),
                "qemu-qcow2": lambda: QemuNbd(self, True),
                "nbdkit-cow": lambda: NbdkitCow(self),
                "cowsnap-origin": lambda: Cowsnap(self, "origin"),
                "cowsnap-snap": lambda: Cowsnap(self, "snapshot"),
            }
            for rep in range(a.repeat):
                log(f"repetition {rep + 1}/{a.repeat}")
                r = {"targets": {}}
                for t in a.targets:
                    r["targets"][t] = self.run_target(servers[t](), rep)
                if a.snapshots:
                    log("scaling: origin first write vs active snapshots and chunk size")
                    r["scaling"] = self.scaling(rep)
                reps.append(r)
            soak = None
            if a.soak:
                log(f"soak: {a.soak}s 4K randrw QD16 on the origin, VmRSS sampled")
                soak = self.soak()
            return reps, soak
        finally:
            self.procs.stop_all()
            if self.work and not a.keep:
                shutil.rmtree(self.work, ignore_errors=True)
            elif self.work:
                log(f"kept work directory {self.work}")


def rss_summary(samples):
    if not samples:
        return {"samples": 0}
    rss = [s["rss_kib"] for s in samples]
    r = {"samples": len(samples), "rss_first_kib": rss[0], "rss_last_kib": rss[-1],
         "rss_min_kib": min(rss), "rss_max_kib": max(rss)}
    ex = [s for s in samples if "exceptions" in s]
    if len(ex) >= 2:
        d_ex = ex[-1]["exceptions"] - ex[0]["exceptions"]
        d_rss = ex[-1]["rss_kib"] - ex[0]["rss_kib"]
        r["exceptions_first"] = ex[0]["exceptions"]
        r["exceptions_last"] = ex[-1]["exceptions"]
        r["rss_growth_bytes_per_exception"] = round(d_rss * 1024 / d_ex, 1) if d_ex else None
    r["series"] = [[s["t"], s["rss_kib"], s.get("exceptions")] for s in samples]
    return r


# --------------------------------------------------------------------------------------------
# aggregation, tables, plot


def metric(job):
    return "mib_s" if "1m" in job else "iops"


def agg(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def bracketed(res, job, m):
    """The local file's speed around a server's run: the mean of the runs just before and
    just after it."""
    runs = [res.get(k, {}).get(job, {}).get(m) for k in ("_paired_local", "_paired_local_after")]
    runs = [v for v in runs if v is not None]
    return sum(runs) / len(runs) if runs else None


def aggregate(reps, args):
    table = {}
    for t in args.targets:
        for job in args.jobs:
            m = metric(job)
            vals = [r["targets"][t].get(job, {}).get(m) for r in reps]
            p50 = [r["targets"][t].get(job, {}).get("p50_us") for r in reps]
            p99 = [r["targets"][t].get(job, {}).get("p99_us") for r in reps]
            cpu = [r["targets"][t].get(job, {}).get("server_cpu_us_per_io") for r in reps]
            paired = [bracketed(r["targets"][t], job, m) for r in reps]
            table[(t, job)] = {"value": agg(vals), "p50": agg(p50), "p99": agg(p99), "cpu": agg(cpu),
                               "paired_local": agg(paired)}
    scaling = {}
    if reps and "scaling" in reps[0]:
        for key in reps[0]["scaling"]:
            scaling[key] = {"iops": agg([r["scaling"][key]["iops"] for r in reps]),
                            "p99": agg([r["scaling"][key]["p99_us"] for r in reps]),
                            "cpu": agg([r["scaling"][key].get("server_cpu_us_per_io") for r in reps])}
    return table, scaling


def med(x):
    return None if x is None else x["median"]


def fmt_val(a, job):
    if a is None:
        return "—"
    v = a["median"]
    s = f"{v:,.0f}" + (" MiB/s" if "1m" in job else "")
    if a["n"] > 1:
        s += f" ({a['min']:,.0f}–{a['max']:,.0f})"
    return s


def ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def fr(x):
    return "—" if x is None else f"{x:.2f}×"


def paired_ratio(a):
    """The server's median over the median of the local runs around it (see `bracketed`)."""
    v, p = a.get("value"), a.get("paired_local")
    return ratio(med(v), med(p)) if v and p else None


def targets_check(table, scaling, args):
    """The targets of issue 5, from medians of this run."""
    g = lambda t, j: med(table.get((t, j), {}).get("value"))
    rows = []

    def add(label, value, goal, cmp=">="):
        if value is None:
            rows.append((label, "not measured", goal, "—"))
            return
        ok = value >= goal if cmp == ">=" else value <= goal
        rows.append((label, f"{value:.2f}", f"{cmp} {goal}", "met" if ok else
                     f"MISSED by {abs(1 - value / goal) * 100:.0f}%"))

    add("origin 4K randread QD16 / qemu-nbd raw", ratio(g("cowsnap-origin", "randread-qd16"), g("qemu-raw", "randread-qd16")), 1.0)
    add("snapshot 4K randread QD16 / qemu-nbd raw", ratio(g("cowsnap-snap", "randread-qd16"), g("qemu-raw", "randread-qd16")), 1.0)
    add("origin 4K first write QD16 / qcow2 overlay first write", ratio(g("cowsnap-origin", "firstwrite-qd16"), g("qemu-qcow2", "firstwrite-qd16")), 3.0)
    add("origin 4K rewrite QD16 / qemu-nbd raw (same log)", ratio(g("cowsnap-origin", "rewrite-qd16"), g("qemu-raw", "rewrite-qd16")), 0.9)
    add("origin 1M seq read / local file", ratio(g("cowsnap-origin", "seqread-1m-qd4"), g("local", "seqread-1m-qd4")), 0.95)
    add("snapshot 1M seq read / local file", ratio(g("cowsnap-snap", "seqread-1m-qd4"), g("local", "seqread-1m-qd4")), 0.95)
    for t, what in (("cowsnap-origin", "origin"), ("cowsnap-snap", "snapshot")):
        a = table.get((t, "seqread-1m-qd4"), {})
        if a.get("paired_local"):
            add(f"{what} 1M seq read / local file measured just before and after it", paired_ratio(a), 0.95)
    c = f"{human(args.chunks[0])}" if args.chunks else "4K"
    i1 = med(scaling.get(f"{c}/1", {}).get("iops"))
    i8 = med(scaling.get(f"{c}/8", {}).get("iops"))
    add(f"first-write cost, 8 snapshots / 1 snapshot ({c} chunks)", ratio(i1, i8), 2.0, "<=")
    return rows


def markdown(meta, table, scaling, reps, soak, args, checks):
    L = []
    L.append(f"## cowsnap benchmark, {meta['date']}")
    L.append("")
    L.append(f"`{meta['command']}` — commit `{meta['git_commit'][:12]}`{' (dirty)' if meta['git_dirty'] else ''}, "
             f"{meta['nproc']} CPUs, kernel {meta['kernel']}, {meta['fio']}, {meta['qemu_nbd']}, {meta['nbdkit']}; "
             f"origin {human(args.size)}, runtime {args.runtime}s per timed job, {args.repeat} repetition(s)"
             + (" (median, min–max)" if args.repeat > 1 else "") + ", "
             f"load average {meta['loadavg_at_start'][0]} at start, {meta.get('loadavg_at_end', ['?'])[0]} at end.")
    L.append("")
    L.append(f"Cache mode: local file `direct=1`; qemu-nbd `--cache=none --aio={meta['qemu_aio']}`; "
             f"nbdkit `file cache=none` (fadvise, not O_DIRECT) with the cow filter (overlay in TMPDIR, page-cached, "
             f"block {args.nbdkit_cow_block or '64K default'}); cowsnap serve "
             + ("`--direct` (O_DIRECT)" if meta["cowsnap_direct"] else "**without** O_DIRECT (no `--direct`)")
             + f", one snapshot, 4K chunks, persistent store. Page cache dropped before read jobs: {meta['drop_caches']}.")
    L.append("")
    L.append("| job | target | IOPS or MiB/s | p50 µs | p99 µs | server CPU µs/IO | × local file | × qemu-nbd raw |")
    L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for job in args.jobs:
        for t in args.targets:
            a = table[(t, job)]
            v = med(a["value"])
            loc = med(table.get(("local", job), {}).get("value"))
            qr = med(table.get(("qemu-raw", job), {}).get("value"))
            p50 = med(a["p50"])
            p99 = med(a["p99"])
            cpu = med(a["cpu"])
            L.append(f"| {job} | {t} | {fmt_val(a['value'], job)} | {'—' if p50 is None else f'{p50:,.0f}'} | "
                     f"{'—' if p99 is None else f'{p99:,.0f}'} | {'—' if cpu is None else f'{cpu:.1f}'} | "
                     f"{fr(ratio(v, loc))} | {fr(ratio(v, qr))} |")
    L.append("")
    paired = [(t, table[(t, "seqread-1m-qd4")]) for t in args.targets
              if (t, "seqread-1m-qd4") in table and table[(t, "seqread-1m-qd4")].get("paired_local")]
    if paired:
        L.append("### 1M sequential read against the local file measured just before and after each server's run")
        L.append("")
        L.append("| target | server MiB/s | local file before/after (mean), MiB/s | ratio |")
        L.append("| --- | ---: | ---: | ---: |")
        for t, a in paired:
            L.append(f"| {t} | {fmt_val(a['value'], 'seqread-1m-qd4')} | "
                     f"{fmt_val(a['paired_local'], 'seqread-1m-qd4')} | {fr(paired_ratio(a))} |")
        L.append("")
    if scaling:
        L.append(f"### Origin first write (4K, QD16) vs active snapshots and chunk size (IOPS; cost relative to 1 snapshot)")
        L.append("")
        L.append("| chunk | " + " | ".join(f"{n} snap" for n in args.snapshots) + " |")
        L.append("| --- | " + " | ".join("---:" for _ in args.snapshots) + " |")
        for chunk in args.chunks:
            c = human(chunk)
            base = med(scaling.get(f"{c}/1", {}).get("iops"))
            cells = []
            for n in args.snapshots:
                a = scaling.get(f"{c}/{n}", {}).get("iops")
                v = med(a)
                cell = "—" if v is None else f"{v:,.0f}"
                if v and base and n >= 1:
                    cell += f" ({base / v:.2f}×)"
                cells.append(cell)
            L.append(f"| {c} | " + " | ".join(cells) + " |")
        L.append("")
    L.append("### Targets of issue 5")
    L.append("")
    L.append("| target | measured | goal | verdict |")
    L.append("| --- | ---: | ---: | --- |")
    for r in checks:
        L.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")
    L.append("")
    if soak:
        L.append(f"### Resident memory (cowsnap serve, {args.soak}s 4K randrw QD16 on the origin, one snapshot)")
        L.append("")
        L.append(f"VmRSS {soak.get('rss_first_kib', 0) / 1024:.1f} MiB at start, {soak.get('rss_max_kib', 0) / 1024:.1f} MiB max, "
                 f"{soak.get('rss_last_kib', 0) / 1024:.1f} MiB at the end; exceptions {soak.get('exceptions_first')} → "
                 f"{soak.get('exceptions_last')}; growth {soak.get('rss_growth_bytes_per_exception')} bytes of RSS per new exception.")
        L.append("")
    rss = [(t, reps[-1]["targets"][t].get("_rss")) for t in args.targets if t.startswith("cowsnap")]
    rss = [(t, r) for t, r in rss if r and r.get("samples")]
    if rss:
        L.append("VmRSS during the job matrix: " + "; ".join(
            f"{t} {r['rss_first_kib'] / 1024:.1f} → {r['rss_last_kib'] / 1024:.1f} MiB (max {r['rss_max_kib'] / 1024:.1f})" for t, r in rss) + ".")
        L.append("")
    notes = []
    for i, r in enumerate(reps):
        for t, res in r["targets"].items():
            for n in res.get("_notes", []):
                notes.append(f"rep {i + 1} {t}: {n}")
            for job, s in res.items():
                if isinstance(s, dict) and s.get("log_note"):
                    notes.append(f"rep {i + 1} {t} {job}: {s['log_note']}")
    if notes:
        L.append("Notes: " + "; ".join(notes))
        L.append("")
    return "\n".join(L)


def svg_plot(table, scaling, args, path, title):
    """Two panels: every job as a ratio to the local file; origin first write vs snapshots."""
    W, H = 980, 430
    colors = {"local": "#777777", "qemu-raw": "#1f77b4", "qemu-qcow2": "#aec7e8", "nbdkit-cow": "#2ca02c",
              "cowsnap-origin": "#d62728", "cowsnap-snap": "#ff9896"}
    e = []
    e.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">')
    e.append(f'<rect width="{W}" height="{H}" fill="white"/>')
    e.append(f'<text x="10" y="18" font-size="13" font-weight="bold">{esc(title)}</text>')
    # panel 1
    x0, y0, pw, ph = 50, 50, 560, 300
    jobs = args.jobs
    tg = [t for t in args.targets if t != "local"]
    vals = {}
    for j in jobs:
        loc = med(table.get(("local", j), {}).get("value"))
        for t in tg:
            vals[(j, t)] = ratio(med(table.get((t, j), {}).get("value")), loc)
    vmax = max([v for v in vals.values() if v] + [1.0])
    vmax = max(1.2, min(vmax * 1.1, 4.0))
    e.append(f'<text x="{x0}" y="{y0 - 12}" font-weight="bold">throughput ÷ local file (io_uring, O_DIRECT)</text>')
    for k in range(0, 11):
        v = vmax * k / 10
        y = y0 + ph - ph * k / 10
        e.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#eee"/>')
        e.append(f'<text x="{x0 - 5}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    y1 = y0 + ph - ph / vmax
    e.append(f'<line x1="{x0}" y1="{y1:.1f}" x2="{x0 + pw}" y2="{y1:.1f}" stroke="#555" stroke-dasharray="4,3"/>')
    gw = pw / len(jobs)
    bw = (gw - 10) / len(tg)
    for i, j in enumerate(jobs):
        for k, t in enumerate(tg):
            v = vals[(j, t)]
            if v is None:
                continue
            h = ph * min(v, vmax) / vmax
            x = x0 + i * gw + 5 + k * bw
            e.append(f'<rect x="{x:.1f}" y="{y0 + ph - h:.1f}" width="{bw - 1:.1f}" height="{h:.1f}" fill="{colors[t]}">'
                     f'<title>{t} {j}: {v:.2f}</title></rect>')
        e.append(f'<text x="{x0 + i * gw + gw / 2:.1f}" y="{y0 + ph + 14}" text-anchor="middle" font-size="10">{j}</text>')
    for k, t in enumerate(tg):
        x = x0 + k * 110
        e.append(f'<rect x="{x}" y="{y0 + ph + 28}" width="10" height="10" fill="{colors[t]}"/>')
        e.append(f'<text x="{x + 14}" y="{y0 + ph + 37}">{t}</text>')
    # panel 2
    if scaling:
        x0, y0, pw, ph = 680, 50, 270, 300
        e.append(f'<text x="{x0}" y="{y0 - 12}" font-weight="bold">cowsnap origin first write, IOPS</text>')
        ns = args.snapshots
        ymax = max([med(s["iops"]) or 0 for s in scaling.values()] + [1]) * 1.1
        for k in range(0, 6):
            v = ymax * k / 5
            y = y0 + ph - ph * k / 5
            e.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#eee"/>')
            e.append(f'<text x="{x0 - 5}" y="{y + 4:.1f}" text-anchor="end">{v / 1000:.0f}k</text>')
        xs = {n: x0 + pw * i / max(1, len(ns) - 1) for i, n in enumerate(ns)}
        for n in ns:
            e.append(f'<text x="{xs[n]:.1f}" y="{y0 + ph + 14}" text-anchor="middle">{n}</text>')
        e.append(f'<text x="{x0 + pw / 2}" y="{y0 + ph + 30}" text-anchor="middle">active snapshots</text>')
        palette = ["#d62728", "#9467bd", "#8c564b", "#17becf"]
        for ci, chunk in enumerate(args.chunks):
            c = human(chunk)
            pts = []
            for n in ns:
                v = med(scaling.get(f"{c}/{n}", {}).get("iops"))
                if v is not None:
                    pts.append((xs[n], y0 + ph - ph * v / ymax))
            col = palette[ci % len(palette)]
            if pts:
                e.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="'
                         + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
                for x, y in pts:
                    e.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{col}"/>')
            e.append(f'<rect x="{x0 + ci * 80}" y="{y0 + ph + 40}" width="10" height="10" fill="{col}"/>')
            e.append(f'<text x="{x0 + ci * 80 + 14}" y="{y0 + ph + 49}">{c} chunks</text>')
    e.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(e) + "\n")


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def machine_meta(args, h):
    def first_line(cmd):
        return out_or(cmd).splitlines()[0] if out_or(cmd) else "?"
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dirty = out_or(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"], "")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "/usr/bin/python3 bench/cowbench.py " + shlex.join(sys.argv[1:]),
        "git_commit": out_or(["git", "-C", REPO, "rev-parse", "HEAD"]),
        "git_dirty": bool(dirty),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "fio": first_line(["fio", "--version"]),
        "qemu_nbd": first_line(["qemu-nbd", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "libnbd": first_line(["nbdinfo", "--version"]),
        "rustc": first_line(["rustc", "--version"]),
        "cowsnap_direct": getattr(h, "direct", None),
        "qemu_aio": getattr(h, "qemu_aio", None),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small image, short runs, reduced scaling (< 3 min)")
    p.add_argument("--size", default=None, help="origin size (default 1G; 256M with --quick)")
    p.add_argument("--runtime", type=int, default=None, help="seconds per timed job (default 8; 2 with --quick)")
    p.add_argument("--ramp", type=int, default=None, help="ramp_time of timed jobs (default 1; 0 with --quick)")
    p.add_argument("--repeat", type=int, default=1, help="repeat the matrix N times; report median, min, max")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma list of " + ",".join(TARGETS))
    p.add_argument("--jobs", default=",".join(JOBS), help="comma list of " + ",".join(JOBS))
    p.add_argument("--snapshots", default=None, help="scaling: snapshot counts (default 0,1,2,4,8,16; '' skips)")
    p.add_argument("--chunks", default=None, help="scaling: chunk sizes (default 4K,16K,64K)")
    p.add_argument("--scale-runtime", type=int, default=None, help="cap per scaling run, seconds")
    p.add_argument("--soak", type=int, default=None, help="seconds of the VmRSS soak run (default 60; 10 with --quick; 0 skips)")
    p.add_argument("--seed", type=int, default=5, help="seed of the first-write log")
    p.add_argument("--nbdkit-cow-block", default=None, help="cow-block-size for the nbdkit cow filter (default: its 64K)")
    p.add_argument("--cowsnap-arg", action="append", default=[], help="extra argument for cowsnap serve (repeatable)")
    p.add_argument("--no-direct", action="store_true", help="run cowsnap serve without --direct")
    p.add_argument("--no-build", action="store_true", help="do not run cargo build")
    p.add_argument("--target-dir", default=None, help="cargo target dir (default $CARGO_TARGET_DIR or target/)")
    p.add_argument("--workdir", default="/var/tmp", help="where the temporary pool and sockets go (not tmpfs: O_DIRECT)")
    p.add_argument("--results", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--fio-timeout", type=int, default=900)
    a = p.parse_args()
    q = a.quick
    a.size = parse_size(a.size or ("256M" if q else "1G"))
    a.runtime = a.runtime or (2 if q else 8)
    a.ramp = a.ramp if a.ramp is not None else (0 if q else 1)
    a.targets = [t for t in a.targets.split(",") if t]
    a.jobs = [j for j in a.jobs.split(",") if j]
    for t in a.targets:
        if t not in TARGETS:
            p.error(f"unknown target {t}")
    for j in a.jobs:
        if j not in JOBS:
            p.error(f"unknown job {j}")
    if a.snapshots is None:
        a.snapshots = "0,1,2,4,8,16" if not q else "0,1,2,8,16"
    a.snapshots = [int(x) for x in a.snapshots.split(",") if x != ""]
    a.chunks = [parse_size(x) for x in (a.chunks or ("4K,64K" if q else "4K,16K,64K")).split(",") if x]
    a.scale_runtime = a.scale_runtime or (2 if q else 6)
    a.soak = a.soak if a.soak is not None else (10 if q else 60)
    if a.size % SLOT:
        p.error("size must be a multiple of 64K")

    h = Harness(a)

    def on_signal(sig, frame):
        raise KeyboardInterrupt(f"signal {sig}")
    signal.signal(signal.SIGTERM, on_signal)

    t0 = time.time()
    load0 = open("/proc/loadavg").read().split()[:3]
    reps, soak = h.main()
    meta = machine_meta(a, h)
    meta["elapsed_s"] = round(time.time() - t0, 1)
    meta["loadavg_at_start"] = load0
    meta["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
    meta["drop_caches"] = "no (not permitted)" if h.ctx.get("drop_warned") else "yes"
    table, scaling = aggregate(reps, a)
    checks = targets_check(table, scaling, a)
    md = markdown(meta, table, scaling, reps, soak, a, checks)
    print(md)
    os.makedirs(a.results, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(a.results, stamp)
    svg_plot(table, scaling, a, base + ".svg", f"cowsnap vs peers, {human(a.size)} origin, {meta['date']}, commit {meta['git_commit'][:10]}")
    doc = {
        "meta": meta,
        "args": {k: v for k, v in vars(a).items()},
        "commands": h.runner.commands,
        "repetitions": reps,
        "summary": {f"{t}/{j}": v for (t, j), v in table.items()},
        "scaling": scaling,
        "targets": [list(r) for r in checks],
        "soak": soak,
    }
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(md + "\n\n![plot](" + stamp + ".svg)\n\nCommands:\n\n```\n" + "\n".join(h.runner.commands) + "\n```\n")
    log(f"results: {base}.md, {base}.json, {base}.svg ({meta['elapsed_s']}s)")


if __name__ == "__main__":
    main()
