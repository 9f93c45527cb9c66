"""Start hosts for tests and benchmarks: as a subprocess or in this process, on port 0.

Usage::

    with ServerProcess(config_path) as proc:          # python -m rpyc_host --config config_path
        host, port = proc.address("demo")             # the real port, from the host's ready file

    with running_host(config_text) as host:           # in-process Host
        conn = rpyc.connect(*host.address("demo"))

    with RegistryProcess() as registry:               # python -m rpyc_host.registry on port 0
        print(registry.spec)                          # "127.0.0.1:PORT" for registry.host

Everything here runs the installed package: no source checkout is needed. Readiness is awaited
with a deadline; stopping sends SIGTERM to the process started here, by PID, and kills it only
if it does not exit in time.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .config import parse_config
from .host import Host

# The directory above the installed package: a source checkout's root when running from one.
# Nothing in this module depends on it.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 10 ms until it is true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class _LogPump:
    """Reads a child's merged stdout/stderr into ``lines`` and a queue, on a daemon thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.done = threading.Event()
        threading.Thread(target=self._pump, name=f"log-{proc.pid}", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                line = line.rstrip("\n")
                self.lines.append(line)
                self.queue.put(line)
        except ValueError:  # stdout closed while reading: the process is gone
            pass
        self.queue.put(None)
        self.done.set()


class ServerProcess:
    """``python -m rpyc_host --config PATH`` as a child process, its log captured.

    The real addresses come from the host's ``--ready-file`` (JSON written once every listener
    accepts): ``address(name)`` for a service, ``ready`` for the whole event (``pid``,
    ``services``, ``gateway``, ``metrics``, ``classic``).
    """

    def __init__(
        self,
        config: str | os.PathLike[str],
        *extra_args: str,
        cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        self.config = str(config)
        self._ready_dir = tempfile.mkdtemp(prefix="rpyc-host-ready-")
        self.ready_file = os.path.join(self._ready_dir, "ready.json")
        self.args = [
            sys.executable,
            "-m",
            "rpyc_host",
            "--config",
            self.config,
            "--ready-file",
            self.ready_file,
            *extra_args,
        ]
        self.cwd = None if cwd is None else str(cwd)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.ready_timeout = ready_timeout
        self.lines: list[str] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self.ready: dict[str, Any] | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._pump: _LogPump | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, wait: bool = True) -> ServerProcess:
        """Start the process; with ``wait``, return once its ready file is written (or fail with the log)."""
        os.makedirs(self._ready_dir, exist_ok=True)
        try:
            os.unlink(self.ready_file)  # a restart must not read the previous process's file
        except FileNotFoundError:
            pass
        self.ready, self.addresses = None, {}
        self.proc = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._pump = _LogPump(self.proc)
        self.lines = self._pump.lines
        if wait:
            self.wait_ready(self.ready_timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait for the ready file; AssertionError with the log if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not self._read_ready():
            assert self.proc is not None, "not started"
            if self.proc.poll() is not None:
                self._drain(5.0)
                raise AssertionError(
                    f"server exited with status {self.proc.returncode} before it was ready:\n{self.log}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready within {timeout} s:\n{self.log}")
            time.sleep(0.01)
        assert self.ready is not None
        return self.ready

    def _read_ready(self) -> bool:
        if self.ready is not None:
            return True
        try:
            with open(self.ready_file, encoding="utf-8") as source:
                event = json.load(source)
        except FileNotFoundError:
            return False
        self.ready = event
        self.addresses = {
            name: (str(entry["host"]), int(entry["port"])) for name, entry in event["services"].items()
        }
        return True

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        """Wait for a log line containing ``text``; AssertionError with the log on timeout/exit."""
        assert self._pump is not None, "not started"
        for line in list(self.lines):
            if text in line:
                return line
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no log line with {text!r} within {timeout} s:\n{self.log}")
            try:
                item = self._pump.queue.get(timeout=left)
            except queue.Empty:
                continue
            if item is None:
                self._pump.queue.put(None)
                raise AssertionError(f"server exited before logging {text!r}:\n{self.log}")
            if text in item:
                return item

    def _drain(self, timeout: float) -> None:
        """Let the pump finish reading what the exited process wrote."""
        if self._pump is not None:
            self._pump.done.wait(timeout)

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self._drain(5.0)
        if self._pump is not None and self._pump.done.is_set() and self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the process; kill it if it has not exited within ``timeout``."""
        if self.proc is None:
            shutil.rmtree(self._ready_dir, ignore_errors=True)
            return 0
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    return self.wait_exit(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
                    raise AssertionError(f"server did not stop within {timeout} s:\n{self.log}") from None
            return self.proc.returncode
        finally:
            shutil.rmtree(self._ready_dir, ignore_errors=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def address(self, name: str) -> tuple[str, int]:
        """The real (host, port) of service ``name``, from the ready file."""
        if not self._read_ready():
            raise AssertionError(f"server is not ready yet (no {self.ready_file}):\n{self.log}")
        try:
            return self.addresses[name]
        except KeyError:
            raise KeyError(f"no service {name!r}; serving: {', '.join(self.addresses)}") from None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


_LISTENING = re.compile(r"registry listening on (?P<host>\S+):(?P<port>\d+)")


class RegistryProcess:
    """``python -m rpyc_host.registry --host HOST --port PORT`` (rpyc's TCP registry server),
    optionally behind a prefix command (``ip netns exec NS``); ``address`` is the real
    (host, port), read from its start-up line."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, prefix: Sequence[str] = (), args: Sequence[str] = ()
    ) -> None:
        self.host, self.port, self.prefix, self.extra_args = host, port, list(prefix), list(args)
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.address: tuple[str, int] = (host, port)

    def start(self, timeout: float = 15.0) -> RegistryProcess:
        """Start the registry (again, after ``stop``, on the same port); AssertionError with its log."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        args = [sys.executable, "-m", "rpyc_host.registry", "--host", self.host, "--port", str(self.port)]
        args += self.extra_args  # e.g. --prune SECONDS
        self.proc = subprocess.Popen(
            [*self.prefix, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        pump = _LogPump(self.proc)  # a restart reads only the new process's lines
        self.lines = pump.lines
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = pump.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("registry did not start:\n" + "\n".join(self.lines))
            match = _LISTENING.search(line)
            if match:
                self.address = (match["host"], int(match["port"]))
                self.port = self.address[1]
                return self

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it is still running after 10 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        assert self.proc.poll() is not None
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    @property
    def spec(self) -> str:
        """``host:port``, as ``registry.host``/``--registry`` take it."""
        return f"{self.address[0]}:{self.address[1]}"

    def discover(self, name: str) -> tuple[tuple[str, int], ...]:
        """The addresses registered under ``name``."""
        from rpyc.utils.registry import TCPRegistryClient

        return tuple(TCPRegistryClient(self.address[0], port=self.address[1], timeout=2).discover(name))

    def __enter__(self) -> RegistryProcess:
        return self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextmanager
def running_host(config_text: str, source: str = "<test config>") -> Iterator[Host]:
    """An in-process :class:`Host` for ``config_text``, stopped (with zero grace) on exit."""
    host = Host(parse_config(config_text, source))
    host.start()
    try:
        yield host
    finally:
        host.stop(grace=0)


def run_cli(
    *args: str,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` (in ``cwd``, default the current directory) and capture its output."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=None if cwd is None else str(cwd),
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass(frozen=True)
class Certificates:
    """PEM files for TLS tests: a CA, a server certificate for 127.0.0.1/localhost, a client
    certificate signed by the CA, and a client certificate signed by another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    rogue_ca: Path


def make_certificates(directory: str | os.PathLike[str]) -> Certificates:
    """Create a throwaway CA and certificates in ``directory`` (needs the ``cryptography`` package)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path

    def make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .sign(key, hashes.SHA256())
        )
        return cert, key

    def issue(cn: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, server: bool) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
        # The server certificate may also authenticate as a client: the gateway presents it to
        # its own services under mutual TLS.
        eku = x509.oid.ExtendedKeyUsageOID
        usages = [eku.SERVER_AUTH, eku.CLIENT_AUTH] if server else [eku.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    ca, ca_key = make_ca("rpyc-host test CA")
    rogue_ca, rogue_ca_key = make_ca("rogue CA")
    ca_path, _ = write("ca", ca, ca_key)
    rogue_ca_path, _ = write("rogue-ca", rogue_ca, rogue_ca_key)
    server_cert, server_key = write("server", *issue("127.0.0.1", ca, ca_key, server=True))
    client_cert, client_key = write("client", *issue("client-1", ca, ca_key, server=False))
    rogue_cert, rogue_key = write("rogue", *issue("rogue", rogue_ca, rogue_ca_key, server=False))
    return Certificates(
        ca_path, server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key, rogue_ca_path
    )


class _LocalConn:
    """Stands in for an rpyc connection in :class:`LocalService`'s hooks."""

    def __init__(self, connid: str) -> None:
        self._config = {"connid": connid, "endpoints": (("local", 0), ("local", 0)), "credentials": None}


class LocalService:
    """Call a service's exposed methods in this process, with its connection hooks, for unit tests.

    Usage::

        with LocalService(InventoryService, warehouse="east") as svc:
            assert svc.root.level("sku-1") == 0

    Only exposed names are reachable through ``root``, as for a remote client; ``on_connect``
    runs on entry and ``on_disconnect`` on exit. Arguments are passed as they are (no copying).
    """

    _ids = iter(range(1, 1 << 62))

    def __init__(self, cls: type, **options: Any) -> None:
        from .exposure import instantiate, per_connection, prepare_class

        self.service = instantiate(prepare_class(cls), options, f"{cls.__name__} options")
        self.instance = per_connection(self.service)
        self.conn = _LocalConn(f"local-{next(self._ids)}")
        self.root = _ExposedView(self.instance)

    def __enter__(self) -> LocalService:
        self.instance.on_connect(self.conn)
        return self

    def __exit__(self, *exc: object) -> None:
        self.instance.on_disconnect(self.conn)
        closer = getattr(self.service, "close", None)
        if callable(closer):
            closer()


class _ExposedView:
    def __init__(self, instance: Any) -> None:
        self._instance = instance

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or not hasattr(self._instance, f"exposed_{name}"):
            raise AttributeError(f"cannot access {name!r}: not an exposed method")
        return getattr(self._instance, f"exposed_{name}")
