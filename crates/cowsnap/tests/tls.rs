//! `cowsnap serve` over TCP with TLS, driven by real clients: nbdinfo and nbdcopy
//! (libnbd, GnuTLS) and qemu-img / qemu-io (`tls-creds-x509`). Certificates are made
//! for each test with the openssl command line: a CA, a server certificate for
//! 127.0.0.1, a client certificate, and a second CA with its own client certificate.
//!
//! A test that needs a tool fails when the tool is missing under CI (`CI` set); elsewhere
//! it prints a SKIP line and returns.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

mod common;

use common::{require_tools, run, scratch, Daemon, Scratch, BIN};
use cowsnap_core::testkit::pattern;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command that must fail; returns its output.
fn fails(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded but should have been refused:\n{}",
        text(&out)
    );
    text(&out)
}

/// A fresh temporary directory holding a pool with one 16 MiB origin `disk`, and the
/// certificates.
struct Setup {
    dir: Scratch,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let s = Setup {
            dir: scratch(&format!("tls-{tag}")),
        };
        run(s.cmd().arg("init"));
        run(s.cmd().args(["origin", "create", "disk", "--size", "16M"]));
        make_ca(&s.path("ca"), "cowsnap test CA");
        make_ca(&s.path("other-ca"), "another CA");
        // What the server and the clients are given, in the qemu/libnbd layouts.
        let server = s.path("server");
        std::fs::create_dir_all(&server).unwrap();
        copy(&s.path("ca/ca-cert.pem"), &server.join("ca-cert.pem"));
        issue(
            &s.path("ca"),
            &server.join("server"),
            "serverAuth",
            "IP:127.0.0.1,DNS:localhost",
        );
        for (who, ca) in [("client", "ca"), ("foreign", "other-ca")] {
            let d = s.path(who);
            std::fs::create_dir_all(&d).unwrap();
            // Every client trusts the server's CA; "foreign" has a certificate of another.
            copy(&s.path("ca/ca-cert.pem"), &d.join("ca-cert.pem"));
            issue(&s.path(ca), &d.join("client"), "clientAuth", "DNS:client");
        }
        let anon = s.path("anon");
        std::fs::create_dir_all(&anon).unwrap();
        copy(&s.path("ca/ca-cert.pem"), &anon.join("ca-cert.pem"));
        s
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("COWSNAP_POOL", self.path("pool"));
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {from:?} {to:?}: {e}"));
}

fn openssl() -> Command {
    let mut c = Command::new("openssl");
    c.stdin(Stdio::null());
    c
}

/// A self-signed CA: `DIR/ca-cert.pem`, `DIR/ca-key.pem`.
fn make_ca(dir: &Path, cn: &str) {
    std::fs::create_dir_all(dir).unwrap();
    run(openssl()
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .arg("-keyout")
        .arg(dir.join("ca-key.pem"))
        .arg("-out")
        .arg(dir.join("ca-cert.pem"))
        .args(["-subj", &format!("/CN={cn}")])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]));
}

/// A certificate signed by the CA in `ca`: `PREFIX-cert.pem` and `PREFIX-key.pem`.
fn issue(ca: &Path, prefix: &Path, usage: &str, san: &str) {
    let p = prefix.display();
    let (key, csr, cert, ext) = (
        format!("{p}-key.pem"),
        format!("{p}.csr"),
        format!("{p}-cert.pem"),
        format!("{p}.ext"),
    );
    run(openssl().args([
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", "/CN=t",
    ]));
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,\
             keyEncipherment\nextendedKeyUsage={usage}\nsubjectAltName={san}\n"
        ),
    )
    .unwrap();
    static SERIAL: AtomicU64 = AtomicU64::new(1);
    run(openssl()
        .args([
            "x509", "-req", "-days", "2", "-in", &csr, "-extfile", &ext, "-out", &cert,
        ])
        .arg("-CA")
        .arg(ca.join("ca-cert.pem"))
        .arg("-CAkey")
        .arg(ca.join("ca-key.pem"))
        .arg("-set_serial")
        .arg(format!("{}", 1000 + SERIAL.fetch_add(1, Ordering::SeqCst))));
    let _ = std::fs::remove_file(csr);
    let _ = std::fs::remove_file(ext);
}

impl Daemon {
    fn start(s: &Setup, args: &[&str]) -> Daemon {
        Daemon::spawn(s.cmd().arg("serve").args(args))
    }
}

/// libnbd URI with TLS credentials from `dir`.
fn nbds(hp: &str, export: &str, dir: &Path) -> String {
    format!("nbds://{hp}/{export}?tls-certificates={}", dir.display())
}

/// qemu-io / qemu-img arguments for the export over TLS with credentials from `dir`.
fn qemu_tls_args(hp: &str, export: &str, dir: &Path) -> Vec<String> {
    let (host, port) = hp.rsplit_once(':').unwrap();
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        ),
        "--image-opts".into(),
        format!("driver=nbd,host={host},port={port},export={export},tls-creds=tls0"),
    ]
}

fn qemu_io(hp: &str, dir: &Path, cmds: &[&str]) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(qemu_tls_args(hp, "disk", dir));
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c
}

/// An NBD client in Python (OpenSSL): STARTTLS, the TLS handshake presenting
/// `DIR/client-cert.pem`, then `NBD_OPT_LIST` inside TLS. Prints SERVED and exits 0 if the
/// server answers, REFUSED and exits 1 if it closes the connection.
fn starttls_probe(hp: &str, dir: &Path) -> Command {
    const PROBE: &str = r#"
import socket, ssl, struct, sys
host, port, d = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=20)
def rx(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("REFUSED: end of stream")
        b += c
    return b
rx(18)
s.sendall(struct.pack(">I", 1) + b"IHAVEOPT" + struct.pack(">II", 5, 0))
magic, opt, typ, ln = struct.unpack(">QIII", rx(20))
assert typ == 1, typ
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(d + "/ca-cert.pem")
ctx.load_cert_chain(d + "/client-cert.pem", d + "/client-key.pem")
try:
    t = ctx.wrap_socket(s, server_hostname=host)
    t.sendall(b"IHAVEOPT" + struct.pack(">II", 3, 0))
    r = t.recv(20)
except (ssl.SSLError, OSError) as e:
    raise SystemExit("REFUSED: %s" % e)
if not r:
    raise SystemExit("REFUSED: end of stream")
print("SERVED")
"#;
    let (host, port) = hp.rsplit_once(':').unwrap();
    let mut c = Command::new("python3");
    c.args(["-c", PROBE, host, port]).arg(dir);
    c
}

#[test]
fn tls_required_real_clients_read_and_write_and_plain_clients_are_refused() {
    let tools = ["openssl", "nbdinfo", "nbdcopy", "qemu-io", "qemu-img"];
    if !require_tools(&tools) {
        return;
    }
    let s = Setup::new("req");
    let server = s.path("server");
    let d = Daemon::start(
        &s,
        &[
            "--listen",
            "tcp:127.0.0.1:0",
            "--listen",
            &format!("unix:{}", s.path("nbd.sock").display()),
            "--tls-creds",
            server.to_str().unwrap(),
        ],
    );
    let hp = d.host_port("nbds");
    assert!(hp.starts_with("127.0.0.1:"), "{hp}");
    // A client with only the CA certificate (no client certificate needed here).
    let anon = s.path("anon");
    let info = text(&run(Command::new("nbdinfo").arg(nbds(&hp, "disk", &anon))));
    assert!(info.contains("with TLS"), "{info}");
    assert!(info.contains("export-size: 16777216"), "{info}");
    assert!(text(&run(Command::new("qemu-img")
        .arg("info")
        .args(qemu_tls_args(&hp, "disk", &anon))))
    .contains("virtual size: 16 MiB"));

    // Writes through qemu-io over TLS read back exactly through nbdcopy over TLS.
    run(&mut qemu_io(
        &hp,
        &anon,
        &["write -P 0x5a 1M 2M", "write -P 0xa5 15M 1M"],
    ));
    let out = s.path("out.img");
    run(Command::new("nbdcopy")
        .arg(nbds(&hp, "disk", &anon))
        .arg(&out));
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), 16 << 20);
    assert!(got[..1 << 20].iter().all(|&b| b == 0));
    assert!(got[1 << 20..3 << 20].iter().all(|&b| b == 0x5a));
    assert!(got[3 << 20..15 << 20].iter().all(|&b| b == 0));
    assert!(got[15 << 20..].iter().all(|&b| b == 0xa5));

    // 16 MiB of pseudo-random data up through nbdcopy (several connections, many
    // requests in flight) and back down, byte for byte.
    let data = pattern(0x1234_5678, 0, 16 << 20);
    let up = s.path("up.img");
    std::fs::write(&up, &data).unwrap();
    run(Command::new("nbdcopy")
        .arg(&up)
        .arg(nbds(&hp, "disk", &anon)));
    let down = s.path("down.img");
    run(Command::new("nbdcopy")
        .arg(nbds(&hp, "disk", &anon))
        .arg(&down));
    assert!(
        std::fs::read(&down).unwrap() == data,
        "data changed on the way"
    );

    // Plain-text clients are refused. libnbd 1.14 prints the server's reason only in its
    // debug output; qemu prints it in its error.
    let plain = format!("nbd://{hp}/disk");
    let out = Command::new("nbdinfo")
        .arg(&plain)
        .env("LIBNBD_DEBUG", "1")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "plain nbdinfo got in: {}",
        text(&out)
    );
    assert!(text(&out).contains("requires TLS"), "{}", text(&out));
    let msg = fails(Command::new("qemu-img").args(["info", &plain]));
    assert!(msg.contains("TLS"), "{msg}");
    let msg = fails(Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 4k", &plain]));
    assert!(msg.contains("TLS"), "{msg}");

    // The unix socket (file mode 0600) stays plain text.
    let unix = format!("nbd+unix:///disk?socket={}", s.path("nbd.sock").display());
    run(Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read 0 64k", &unix]));
    let plain_unix = text(&run(Command::new("nbdinfo").arg(&unix)));
    assert!(plain_unix.contains("without TLS"), "{plain_unix}");

    let (st, log) = d.stop();
    assert!(st.success(), "{log:?}");
}

#[test]
fn tls_verify_peer_refuses_clients_without_a_certificate_of_the_ca() {
    let tools = ["openssl", "nbdinfo", "qemu-io", "python3"];
    if !require_tools(&tools) {
        return;
    }
    let s = Setup::new("peer");
    let server = s.path("server");
    let d = Daemon::start(
        &s,
        &[
            "--listen",
            "tcp:127.0.0.1:0",
            "--tls-creds",
            server.to_str().unwrap(),
            "--tls-verify-peer",
        ],
    );
    let hp = d.host_port("nbds");
    let client = s.path("client");
    // With a certificate from the CA: served, with libnbd and qemu.
    let info = text(&run(Command::new("nbdinfo").arg(nbds(&hp, "disk", &client))));
    assert!(info.contains("export-size: 16777216"), "{info}");
    let io = text(&run(&mut qemu_io(
        &hp,
        &client,
        &["write -P 0x77 0 64k", "read -P 0x77 0 64k"],
    )));
    assert!(io.contains("read 65536/65536"), "{io}");
    // Without a client certificate: refused (libnbd and qemu).
    let anon = s.path("anon");
    let msg = fails(Command::new("nbdinfo").arg(nbds(&hp, "disk", &anon)));
    assert!(msg.contains("TLS") || msg.contains("gnutls"), "{msg}");
    // (qemu's message depends on timing: a TLS alert or a broken pipe; the server's log
    // below says why.)
    fails(&mut qemu_io(&hp, &anon, &["read 0 4k"]));
    // With a certificate of another CA: refused, with libnbd and with Python's ssl
    // (OpenSSL). qemu checks its own certificate against its CA file first and never
    // connects, so it is not tried here.
    let foreign = s.path("foreign");
    let msg = fails(Command::new("nbdinfo").arg(nbds(&hp, "disk", &foreign)));
    assert!(msg.contains("TLS") || msg.contains("gnutls"), "{msg}");
    let msg = fails(&mut starttls_probe(&hp, &foreign));
    assert!(msg.contains("REFUSED"), "{msg}");
    // The same probe with the CA's client certificate is served (the probe works).
    let msg = text(&run(&mut starttls_probe(&hp, &client)));
    assert!(msg.contains("SERVED"), "{msg}");
    let (st, log) = d.stop();
    assert!(st.success(), "{log:?}");
    let refused = |why: &str| {
        log.iter()
            .filter(|l| l.contains("refused a client: TLS handshake failed") && l.contains(why))
            .count()
    };
    assert_eq!(refused("no certificates"), 2, "{log:?}");
    // libnbd and the probe presented the other CA's certificate: the verifier refused it.
    assert_eq!(refused("UnknownIssuer"), 2, "{log:?}");
}

#[test]
fn network_listeners_need_tls_or_insecure_and_credentials_errors_name_the_file() {
    if !require_tools(&["openssl"]) {
        return;
    }
    let s = Setup::new("policy");
    // Plain text on every address: refused, with what to do.
    let msg = fails(s.cmd().args(["serve", "--listen", "tcp:0.0.0.0:0"]));
    assert!(
        msg.contains("--tls-creds") && msg.contains("--insecure"),
        "{msg}"
    );
    let msg = fails(
        s.cmd()
            .args(["serve", "--listen", "tcp:0.0.0.0:0", "--tls", "on"]),
    );
    assert!(msg.contains("--tls-creds"), "{msg}");
    // A missing key is named.
    let broken = s.path("broken");
    std::fs::create_dir_all(&broken).unwrap();
    copy(
        &s.path("server/server-cert.pem"),
        &broken.join("server-cert.pem"),
    );
    let msg = fails(s.cmd().args([
        "serve",
        "--listen",
        "tcp:127.0.0.1:0",
        "--tls-creds",
        broken.to_str().unwrap(),
    ]));
    assert!(msg.contains("server-key.pem"), "{msg}");
    // --tls-verify-peer without a CA certificate names it.
    copy(
        &s.path("server/server-key.pem"),
        &broken.join("server-key.pem"),
    );
    let msg = fails(s.cmd().args([
        "serve",
        "--listen",
        "tcp:127.0.0.1:0",
        "--tls-creds",
        broken.to_str().unwrap(),
        "--tls-verify-peer",
    ]));
    assert!(msg.contains("ca-cert.pem"), "{msg}");
    // --insecure: served, and the printed URIs never show the wildcard address.
    let d = Daemon::start(&s, &["--listen", "tcp:0.0.0.0:0", "--insecure"]);
    let hp = d.host_port("nbd");
    assert!(hp.starts_with("127.0.0.1:"), "{hp}");
    let (st, log) = d.stop();
    assert!(st.success());
    assert!(log.iter().all(|l| !l.contains("0.0.0.0")), "{log:?}");
    // With TLS required, a wildcard bind is fine and printed as nbds://.
    let server = s.path("server");
    let d = Daemon::start(
        &s,
        &[
            "--listen",
            "tcp:0.0.0.0:0",
            "--tls-creds",
            server.to_str().unwrap(),
        ],
    );
    let hp = d.host_port("nbds");
    assert!(hp.starts_with("127.0.0.1:"), "{hp}");
    let (st, log) = d.stop();
    assert!(st.success());
    assert!(log.iter().all(|l| !l.contains("0.0.0.0")), "{log:?}");
}
