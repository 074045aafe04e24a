"""Shared TLS test helpers: a throw-away CA with a server certificate for 127.0.0.1 and
localhost (``make_test_ca``), and a real HTTPS server for any WSGI app on a loopback
address (``serving_tls``).

Used by the client tests (``qimem --server https://... --ca-cert``, ``qauth`` likewise) and
the nginx deployment test. Keys are ECDSA P-256 (fast to make); nothing touches the network
beyond loopback.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The names the server certificate is valid for by default.
DEFAULT_NAMES: tuple[str, ...] = ("127.0.0.1", "localhost")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def make_test_ca(
    tmpdir: str | os.PathLike[str],
    names: Sequence[str] = DEFAULT_NAMES,
    *,
    prefix: str = "",
) -> tuple[Path, Path, Path]:
    """A new CA and a server certificate it signed, written as PEM files into ``tmpdir``.

    :param names: the server certificate's subjectAltNames: IP addresses become IP entries,
        anything else a DNS entry (default: IP 127.0.0.1 and DNS localhost).
    :param prefix: file name prefix, to keep several CAs in one directory.
    :returns: ``(ca_cert_path, server_cert_path, server_key_path)``; the key file is 0600.
    """
    directory = Path(tmpdir)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("qimem test CA"))
        .issuer_name(_name("qimem test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0] if names else "qimem test server"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_path = directory / f"{prefix}ca.pem"
    cert_path = directory / f"{prefix}server-cert.pem"
    key_path = directory / f"{prefix}server-key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, server_key)
    return ca_path, cert_path, key_path


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@contextlib.contextmanager
def serving_tls(
    wsgi: Any, cert_path: Path, key_path: Path, *, host: str = "127.0.0.1"
) -> Iterator[str]:
    """A real HTTPS server (stdlib wsgiref, one thread per connection) for ``wsgi`` on a free
    port of the loopback address ``host``; yields ``https://host:port`` and stops it
    afterwards. A client that rejects the certificate just fails its handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server = make_server(
        host, 0, wsgi, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    try:
        yield f"https://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(15)
        assert not thread.is_alive(), "TLS server did not stop"


# ---- a real nginx terminating TLS in front of qimem serve ----------------------------------

#: The deployment config of docs/operations.md, run as is by the nginx tests.
NGINX_SITE_TEMPLATE = Path(__file__).resolve().parent.parent / "docs" / "nginx-qimem.conf"
#: What the tests replace in the template: the values an operator replaces too.
_SITE_DEFAULTS = {
    "listen": "listen 443 ssl;",
    "upstream": "server 127.0.0.1:8080;",
    "tls_dir": "/etc/qimem/tls/",
}
_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary() -> str | None:
    """The nginx executable (PATH, then /usr/sbin), or None."""
    import shutil

    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def nginx_site(listen: str, upstream: str, tls_dir: Path) -> str:
    """The template with the listen address, qimem's address and the certificate directory
    (which must hold ``server-cert.pem`` and ``server-key.pem``) filled in."""
    text = NGINX_SITE_TEMPLATE.read_text("utf-8")
    values = {
        "listen": f"listen {listen} ssl;",
        "upstream": f"server {upstream};",
        "tls_dir": f"{tls_dir}/",
    }
    for name, default in _SITE_DEFAULTS.items():
        assert default in text, f"{NGINX_SITE_TEMPLATE} no longer has {default!r}"
        text = text.replace(default, values[name])
    return text


class Nginx:
    """nginx in the foreground with its own prefix, config, pid, logs and temp files in
    ``workdir``; the site config is included in its ``http`` block. ``proxy_bind`` makes it
    connect upstream from that loopback address (so the proxy's address differs from its
    clients'). Stop it with :meth:`stop`."""

    def __init__(
        self, workdir: Path, site: str, listen_port: int, *, proxy_bind: str | None = None
    ) -> None:
        import subprocess

        binary = nginx_binary()
        assert binary is not None, "nginx is not installed"
        self.workdir = workdir
        self.port = listen_port
        workdir.mkdir(parents=True, exist_ok=True)
        for name in _TEMP_DIRS:
            (workdir / "tmp" / name).mkdir(parents=True, exist_ok=True)
        (workdir / "qimem.conf").write_text(site, "utf-8")
        temps = "\n".join(f"    {n}_temp_path {workdir}/tmp/{n};" for n in _TEMP_DIRS)
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers write the temp dirs
        bind = f"    proxy_bind {proxy_bind};\n" if proxy_bind else ""
        (workdir / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {workdir}/nginx.pid;\n"
            f"error_log {workdir}/error.log warn;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n    access_log {workdir}/access.log;\n{temps}\n{bind}"
            f"    include {workdir}/qimem.conf;\n}}\n",
            "utf-8",
        )
        self.error_log = workdir / "error.log"
        self.proc = subprocess.Popen(
            [binary, "-p", f"{workdir}/", "-e", str(self.error_log),
             "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "stderr.log").open("wb"),
        )  # fmt: skip

    def wait_ready(self, timeout: float = 20.0) -> Nginx:
        import socket
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited {self.proc.returncode}: {self.logs()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nginx did not start: {self.logs()}")

    def logs(self) -> str:
        return "".join(
            p.read_text("utf-8", errors="replace")
            for p in (self.workdir / "stderr.log", self.error_log)
            if p.exists()
        )

    def stop(self) -> None:
        """Graceful stop (SIGQUIT), killed after 10 s."""
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
