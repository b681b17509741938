"""Run a real Apache Kafka broker (KRaft mode, no ZooKeeper, no Docker) locally.

The broker is the official Apache Kafka distribution's ``kafka.Kafka`` main class,
run from the jars that :func:`ensure_jars` resolves once from Maven Central (with
``mvn`` and ``devkafka/pom.xml``) into a per-user cache.  It needs ``java`` (17+)
on ``PATH`` (or ``$JAVA_HOME/bin/java``) and, on the first run only, ``mvn``.

Layout of a broker's ``data_dir`` (created as needed; everything stays inside it)::

    data_dir/
      server.properties   broker config, rewritten on every start()
      log4j2.properties   logging config, rewritten on every start()
      broker.log          the JVM's stdout/stderr (normally near-empty)
      logs/server.log     the broker's own log4j2 log (rolled at 20 MB, 3 kept)
      kraft/              log.dirs: KRaft metadata log and topic partitions
      devkafka.json       cluster id and ports picked on first start
      tls/                only with a TLS listener: own CA, broker and client certificates

Besides the PLAINTEXT client listener a node can open secured ones for testing client
security settings (see :class:`LocalKafka`): SASL_PLAINTEXT (PLAIN, SCRAM-SHA-256 and
SCRAM-SHA-512), SSL (server certificate from a CA generated with ``openssl``) and
SASL_SSL.  Inter-broker and controller traffic stay PLAINTEXT.

Time values are seconds unless a name says otherwise (``*_ms``); sizes are
mebibytes where named ``*_mb``.
"""

from __future__ import annotations

import atexit
import base64
import concurrent.futures
import contextlib
import ctypes
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

log = logging.getLogger(__name__)

KAFKA_VERSION: str = "4.1.1"
"""Apache Kafka version run by this module (Maven artifact ``org.apache.kafka:kafka_2.13``)."""

POM_PATH: Path = Path(__file__).resolve().parent / "pom.xml"
"""The dependency list handed to ``mvn`` by :func:`ensure_jars`."""

_MARKER_NAME = "libs.complete"
_LOCK_NAME = ".lock"
_STATE_NAME = "devkafka.json"
_LOG_DIR_NAME = "kraft"
_POLL_INTERVAL_S = 0.25
_TLS_DIR_NAME = "tls"
_CERT_DAYS = 3650

SASL_MECHANISMS: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
"""SASL mechanisms enabled on the SASL_PLAINTEXT and SASL_SSL listeners."""

DEFAULT_SASL_USERS: Mapping[str, str] = MappingProxyType({"bridge": "bridge-secret"})
"""User name -> password accepted on the SASL listeners when none are given."""

_CREDENTIAL_RE = re.compile(r"[A-Za-z0-9._@+-]+")


class DevKafkaError(RuntimeError):
    """Raised when the jars cannot be resolved or a broker cannot be started/stopped."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now (the OS picks it).

    There is an unavoidable window between this call and the broker binding the port,
    so another process may grab it in between; fine for tests and dev.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def default_cache_dir() -> Path:
    """Per-version cache directory used when :func:`ensure_jars` gets no ``cache_dir``.

    ``${WIFI_BRIDGE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/wifi-bridge}/kafka-<KAFKA_VERSION>``
    (empty variables count as unset).
    """
    base = os.environ.get("WIFI_BRIDGE_CACHE")
    if base:
        root = Path(base).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "wifi-bridge"
    return root / f"kafka-{KAFKA_VERSION}"


def find_java() -> str:
    """Path of the ``java`` executable: ``$JAVA_HOME/bin/java`` if present, else ``PATH``.

    Raises :class:`DevKafkaError` naming what is missing.
    """
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise DevKafkaError(
            "`java` not found (neither $JAVA_HOME/bin/java nor on PATH): the local Kafka "
            "broker needs a Java 17+ runtime (e.g. `apt-get install openjdk-17-jre-headless`)"
        )
    return found


def _marker_text() -> str:
    pom_digest = hashlib.sha256(POM_PATH.read_bytes()).hexdigest()
    return f"kafka {KAFKA_VERSION}\npom-sha256 {pom_digest}\n"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive ``fcntl.flock`` on ``path`` (created if missing) for the ``with`` body."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _jars_complete(cache_dir: Path, expected: str) -> bool:
    marker = cache_dir / _MARKER_NAME
    try:
        return marker.read_text() == expected and (cache_dir / "libs").is_dir()
    except OSError:
        return False


def ensure_jars(cache_dir: Path | None = None) -> Path:
    """Make sure the Kafka broker jars are on disk and return the ``libs`` directory.

    ``cache_dir`` is the per-version cache directory (default: :func:`default_cache_dir`);
    the jars land in ``cache_dir/libs``.  The first call runs ``mvn`` (Maven Central,
    roughly 40 MB, some 15-30 s) and prints one progress line to stderr; later calls
    only check a marker file, which is written after a complete, successful copy and
    records the Kafka version and a hash of ``pom.xml`` (a changed pom re-resolves).
    Concurrent callers (processes or threads) serialise on an ``fcntl`` lock file in
    ``cache_dir``, so exactly one of them downloads.

    Raises :class:`DevKafkaError` if ``mvn`` or ``java`` is missing or Maven fails.
    """
    cache_dir = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    cache_dir = cache_dir.resolve()
    libs = cache_dir / "libs"
    expected = _marker_text()
    if _jars_complete(cache_dir, expected):
        return libs
    with file_lock(cache_dir / _LOCK_NAME):
        if _jars_complete(cache_dir, expected):
            return libs
        _resolve_jars(cache_dir, libs)
        (cache_dir / _MARKER_NAME).write_text(expected)
    return libs


def _resolve_jars(cache_dir: Path, libs: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise DevKafkaError(
            "`mvn` (Apache Maven) not found on PATH: it is needed once to download the "
            f"Apache Kafka {KAFKA_VERSION} jars into {libs} (e.g. `apt-get install maven`)"
        )
    java = find_java()
    (cache_dir / _MARKER_NAME).unlink(missing_ok=True)
    partial = cache_dir / "libs.partial"
    shutil.rmtree(partial, ignore_errors=True)
    print(
        f"devkafka: resolving Apache Kafka {KAFKA_VERSION} jars from Maven Central "
        f"(first run only) into {libs} …",
        file=sys.stderr,
        flush=True,
    )
    env = dict(os.environ)
    env.setdefault("JAVA_HOME", str(Path(java).resolve().parent.parent))
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(POM_PATH),
        "dependency:copy-dependencies",
        f"-Dkafka.version={KAFKA_VERSION}",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={partial}",
    ]
    started = time.monotonic()
    proc = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        check=False,
    )
    jars = sorted(partial.glob("kafka_2.13-*.jar")) if partial.is_dir() else []
    if proc.returncode != 0 or not jars:
        shutil.rmtree(partial, ignore_errors=True)
        tail = "\n".join(proc.stdout.strip().splitlines()[-30:])
        raise DevKafkaError(
            f"resolving the Kafka {KAFKA_VERSION} jars with mvn failed "
            f"(exit {proc.returncode}):\n{tail}"
        )
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)
    elapsed = time.monotonic() - started
    count = len(list(libs.glob("*.jar")))
    print(
        f"devkafka: {count} jars ready in {libs} ({elapsed:.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    log.info("resolved %d Kafka jars into %s in %.1f s", count, libs, elapsed)


def random_cluster_id() -> str:
    """A new random KRaft cluster id (22 chars, base64url of a UUID, like Kafka's own)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not text.startswith("-"):
            return text


# ---------------------------------------------------------------- readiness probe


def _kstring(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">h", len(raw)) + raw


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        chunks.extend(chunk)
    return bytes(chunks)


def _request(sock: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> bytes:
    header = struct.pack(">hhi", api_key, version, corr) + _kstring("devkafka-probe")
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    response = _recv_exact(sock, size)
    (got_corr,) = struct.unpack(">i", response[:4])
    if got_corr != corr:
        raise ConnectionError(f"correlation id mismatch ({got_corr} != {corr})")
    return response[4:]


def broker_ids(host: str, port: int, *, timeout_s: float = 2.0) -> list[int] | None:
    """Node ids of the live brokers the broker at ``host:port`` reports, or ``None``.

    Speaks the Kafka wire protocol directly (ApiVersions v0, then Metadata v4 for no
    topics), so it needs no client library.  ``None`` means not reachable or not
    serving yet; the broker only opens its client listener once it has caught up with
    the metadata log and been unfenced, so an answer means it really serves.
    ``timeout_s`` bounds connect and each read.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            api_versions = _request(sock, 18, 0, 1, b"")
            (error_code,) = struct.unpack(">h", api_versions[:2])
            if error_code != 0:
                return None
            # Metadata v4: topics = [] (none), allow_auto_topic_creation = false.
            meta = _request(sock, 3, 4, 2, struct.pack(">i?", 0, False))
            offset = 4  # throttle_time_ms
            (count,) = struct.unpack_from(">i", meta, offset)
            offset += 4
            ids: list[int] = []
            for _ in range(count):
                (node_id,) = struct.unpack_from(">i", meta, offset)
                offset += 4
                (host_len,) = struct.unpack_from(">h", meta, offset)
                offset += 2 + host_len + 4  # host, port
                (rack_len,) = struct.unpack_from(">h", meta, offset)
                offset += 2 + max(rack_len, 0)
                ids.append(node_id)
            return sorted(ids)
    except (OSError, ConnectionError, struct.error):
        return None


def is_serving(host: str, port: int, *, node_id: int | None = None, timeout_s: float = 2.0) -> bool:
    """True if a Kafka broker answers metadata requests on ``host:port``.

    With ``node_id`` the answer must also list that broker as alive (``timeout_s``
    as in :func:`broker_ids`).
    """
    ids = broker_ids(host, port, timeout_s=timeout_s)
    if ids is None or not ids:
        return False
    return node_id is None or node_id in ids


# ------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie (Linux ``/proc`` aware)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # "pid (comm) S ..." - comm may contain spaces/parens, the state follows the last ')'.
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else ""
    return state not in ("Z", "X")


def pid_cmdline(pid: int) -> list[str]:
    """Command line of process ``pid`` (empty list if unknown)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def is_broker_process(pid: int, data_dir: Path) -> bool:
    """True if ``pid`` is a live ``kafka.Kafka`` JVM whose config lives in ``data_dir``.

    Guards pid files against pid reuse.
    """
    if not pid_alive(pid):
        return False
    cmd = pid_cmdline(pid)
    config = str(data_dir.resolve() / "server.properties")
    return "kafka.Kafka" in cmd and config in cmd


def terminate_pid(pid: int, timeout_s: float = 30.0) -> bool:
    """SIGTERM process group/process ``pid``, wait up to ``timeout_s``, then SIGKILL.

    For processes that are not our children (e.g. a broker started by an earlier
    ``python -m devkafka up``).  Returns True if SIGKILL was needed.
    """
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return False
        time.sleep(0.1)
    _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group led by ``pid`` (brokers run as group leaders), else ``pid``."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


_PR_SET_PDEATHSIG = 1
_OWNED: weakref.WeakSet[subprocess.Popen[bytes]] = weakref.WeakSet()


@atexit.register
def _kill_owned_brokers() -> None:
    """On interpreter exit, SIGKILL brokers started with ``die_with_parent`` still alive."""
    for proc in list(_OWNED):
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _die_with_parent_hook(parent_pid: int) -> Callable[[], None]:
    """``preexec_fn`` that makes the child get SIGKILL when the spawning thread exits."""

    def hook() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent_pid:  # parent already gone before prctl took effect
            os._exit(1)

    return hook


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tail(path: Path, lines: int = 40, start: int = 0) -> str:
    """Last ``lines`` lines of ``path`` written after byte offset ``start``."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            if start > size:  # rolled over since
                start = 0
            handle.seek(max(start, size - 64 * 1024))
            data = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


# ------------------------------------------------------------------- security


def _check_credentials(users: Mapping[str, str]) -> dict[str, str]:
    """Copy of ``users`` after checking names and passwords are safe to embed unquoted.

    They end up in a JAAS config line, a ``server.properties`` value and the storage
    tool's ``--add-scram`` argument, so only ``A-Z a-z 0-9 . _ @ + -`` are allowed.
    """
    checked: dict[str, str] = {}
    for name, password in users.items():
        for what, text in (("user name", name), ("password", password)):
            if not _CREDENTIAL_RE.fullmatch(text):
                raise ValueError(
                    f"SASL {what} {text!r} for user {name!r}: use only letters, digits and "
                    "'._@+-' (non-empty)"
                )
        checked[name] = password
    return checked


def _credentials_digest(users: Mapping[str, str]) -> str:
    text = "\n".join(f"{name}\0{users[name]}" for name in sorted(users))
    return hashlib.sha256(text.encode()).hexdigest()


def _escape_property(value: str) -> str:
    """``value`` escaped for a Java ``.properties`` file (backslashes and line breaks)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _san_entries(host: str) -> list[str]:
    """``subjectAltName`` entries of the broker certificate: 127.0.0.1, localhost, ``host``."""
    entries = ["IP:127.0.0.1", "DNS:localhost"]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        extra = f"DNS:{host}"
    else:
        extra = f"IP:{host}"
    if extra not in entries and host not in ("", "0.0.0.0", "::"):
        entries.append(extra)
    return entries


def _openssl(args: Sequence[str], cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise DevKafkaError(
            "`openssl` not found on PATH: it generates the certificates of the local "
            "broker's SSL listener (e.g. `apt-get install openssl`)"
        )
    proc = subprocess.run(
        [openssl, *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise DevKafkaError(
            f"`openssl {' '.join(args[:2])}` failed (exit {proc.returncode}):\n"
            + proc.stdout.strip()
        )


def _issue_certificate(tls_dir: Path, name: str, subject: str, extensions: str) -> None:
    """New key ``<name>.key`` and certificate ``<name>.pem`` signed by the CA in ``tls_dir``."""
    (tls_dir / f"{name}.ext").write_text(extensions)
    _openssl(
        [
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
        ],
        tls_dir,
    )  # fmt: skip
    _openssl(
        [
            "x509", "-req", "-sha256", "-in", f"{name}.csr",
            "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", f"0x{uuid.uuid4().hex}", "-days", str(_CERT_DAYS),
            "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        ],
        tls_dir,
    )  # fmt: skip
    (tls_dir / f"{name}.key").chmod(0o600)


def ensure_tls_material(tls_dir: Path, host: str) -> None:
    """Create (once) a self-signed CA and certificates it signs, in ``tls_dir``.

    Files: ``ca.pem`` (CA certificate: what clients verify the broker with) and
    ``ca.key``; ``broker.pem`` / ``broker.key`` (server certificate and its unencrypted
    PKCS#8 RSA key) with ``san.txt`` (its subjectAltName); ``client.pem`` /
    ``client.key`` (a client certificate, CN ``devkafka-client``, for mutual TLS).  The
    broker certificate names ``IP:127.0.0.1``, ``DNS:localhost`` and ``host``; it is
    re-issued when that list changes, the CA and client certificate only when a file is
    missing.  All are valid for 3650 days.  Needs ``openssl`` on ``PATH``; raises
    :class:`DevKafkaError` when it fails.
    """
    tls_dir.mkdir(parents=True, exist_ok=True)
    tls_dir.chmod(0o700)
    ca_pem, ca_key, san_file = tls_dir / "ca.pem", tls_dir / "ca.key", tls_dir / "san.txt"
    san = ",".join(_san_entries(host))
    new_ca = not (ca_pem.is_file() and ca_key.is_file())
    if new_ca:
        log.info("generating a self-signed CA in %s", tls_dir)
        _openssl(
            [
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                "-days", str(_CERT_DAYS),
                "-keyout", ca_key.name, "-out", ca_pem.name,
                "-subj", "/CN=devkafka local CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-addext", "subjectKeyIdentifier=hash",
            ],
            tls_dir,
        )  # fmt: skip
        ca_key.chmod(0o600)
    leaf = (
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    try:
        current_san = san_file.read_text().strip()
    except OSError:
        current_san = ""
    broker_files = (tls_dir / "broker.pem", tls_dir / "broker.key")
    if new_ca or current_san != san or not all(path.is_file() for path in broker_files):
        log.info("issuing the broker certificate for %s in %s", san, tls_dir)
        extensions = leaf + f"extendedKeyUsage=serverAuth\nsubjectAltName={san}\n"
        _issue_certificate(tls_dir, "broker", "/CN=localhost", extensions)
        san_file.write_text(san + "\n")
    client_files = (tls_dir / "client.pem", tls_dir / "client.key")
    if new_ca or not all(path.is_file() for path in client_files):
        log.info("issuing a client certificate in %s", tls_dir)
        extensions = leaf + "extendedKeyUsage=clientAuth\n"
        _issue_certificate(tls_dir, "client", "/CN=devkafka-client", extensions)


# ------------------------------------------------------------------- the broker


class LocalKafka:
    """One local Apache Kafka node in KRaft combined mode (broker + controller).

    Keyword-only arguments:

    * ``data_dir``: where config, logs and partition data live (created if missing;
      made absolute).  Reusing a directory keeps the topics and messages: it is
      formatted (KRaft ``meta.properties``, random cluster id) only the first time.
    * ``port``: client (PLAINTEXT) listener port, default 9092.
    * ``controller_port``: KRaft controller listener port; ``None`` picks a free one on
      first start and reuses it on later starts of the same ``data_dir``.
    * ``host``: bind and advertised address, default ``127.0.0.1``.
    * ``heap_mb``: JVM max heap in MiB (``-Xmx``), default 512.
    * ``extra_properties``: additional/overriding ``server.properties`` entries.
    * ``cache_dir``: jar cache passed to :func:`ensure_jars` (default: its default).
    * ``die_with_parent``: if True (default) the broker does not outlive this Python
      process: it gets SIGKILL when the process dies, even by SIGKILL (Linux
      ``PR_SET_PDEATHSIG``; applied only when started from the main thread, since the
      kernel ties it to the forking thread), and an ``atexit`` hook kills it on a normal
      exit that skipped :meth:`stop`.  So a crashed test run leaves no orphan JVM.  Set
      False for a broker that must outlive this process (``python -m devkafka up``).
    * ``jvm_args``: extra JVM options, appended after the defaults (so they win).
    * ``sasl_port``: if set, also a SASL_PLAINTEXT client listener on that port, with
      the mechanisms in :data:`SASL_MECHANISMS` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512).
      Default ``None`` (no such listener).
    * ``ssl_port``: if set, also an SSL (TLS) client listener on that port.  Its
      certificate is signed by a CA generated with ``openssl`` into ``data_dir/tls``
      on first use (:func:`ensure_tls_material`); clients verify it with
      :attr:`ssl_cafile`.  Default ``None``.
    * ``sasl_ssl_port``: if set, also a SASL_SSL listener (the SASL mechanisms and
      users below, over that same TLS certificate).  Default ``None``.
    * ``ssl_client_auth``: ``ssl.client.auth`` of the SSL and SASL_SSL listeners:
      ``"none"`` (default: no client certificate asked), ``"requested"`` or
      ``"required"``.  A client certificate signed by the CA is in
      :attr:`ssl_client_certfile` / :attr:`ssl_client_keyfile`.  One listener alone:
      ``extra_properties={"listener.name.sasl_ssl.ssl.client.auth": "required"}``.
    * ``sasl_users``: user name -> password accepted on the SASL listeners, default
      :data:`DEFAULT_SASL_USERS` (``bridge`` / ``bridge-secret``).  Letters, digits and
      ``._@+-`` only.  PLAIN users come from the listener's inline JAAS config, so they
      follow every start.  SCRAM credentials live in the KRaft metadata log and are
      written when ``data_dir`` is first formatted (storage tool ``--add-scram``, once
      per mechanism and user): a data dir formatted without SASL, or with other
      users, keeps its old SCRAM credentials (a warning is logged), so choose the
      users at first start or use a fresh ``data_dir``.

    Inter-broker and controller traffic always use the PLAINTEXT listeners, and
    :meth:`start` waits on the PLAINTEXT one (all listeners open together).

    Usable as a context manager (``start()`` on enter, ``stop()`` on exit).
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int = 9092,
        controller_port: int | None = None,
        host: str = "127.0.0.1",
        heap_mb: int = 512,
        extra_properties: Mapping[str, str] | None = None,
        cache_dir: Path | None = None,
        die_with_parent: bool = True,
        jvm_args: Sequence[str] = (),
        sasl_port: int | None = None,
        ssl_port: int | None = None,
        sasl_ssl_port: int | None = None,
        sasl_users: Mapping[str, str] | None = None,
        ssl_client_auth: str = "none",
    ) -> None:
        if ssl_client_auth not in ("none", "requested", "required"):
            raise ValueError(
                f"ssl_client_auth must be none, requested or required, not {ssl_client_auth!r}"
            )
        self.data_dir: Path = Path(data_dir).expanduser().resolve()
        self.port: int = port
        self.sasl_port: int | None = sasl_port
        self.ssl_port: int | None = ssl_port
        self.sasl_ssl_port: int | None = sasl_ssl_port
        self.sasl_users: dict[str, str] = _check_credentials(
            DEFAULT_SASL_USERS if sasl_users is None else sasl_users
        )
        self.ssl_client_auth: str = ssl_client_auth
        self.controller_port: int | None = controller_port
        self.host: str = host
        self.heap_mb: int = heap_mb
        self.extra_properties: dict[str, str] = dict(extra_properties or {})
        self.cache_dir: Path | None = cache_dir
        self.die_with_parent: bool = die_with_parent
        self.jvm_args: list[str] = list(jvm_args)
        # Set by LocalKafkaCluster: node id and static voter list (None: standalone).
        self.node_id: int = 1
        self._static_voters: str | None = None
        self._cluster_id: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offsets: dict[Path, int] = {}

    # ----------------------------------------------------------------- properties

    @property
    def bootstrap_servers(self) -> str:
        """``"host:port"`` of the client listener, for Kafka clients."""
        return f"{self.host}:{self.port}"

    @property
    def sasl_bootstrap_servers(self) -> str:
        """``"host:port"`` of the SASL_PLAINTEXT listener; DevKafkaError if there is none."""
        return self._endpoint("SASL_PLAINTEXT", self.sasl_port, "sasl_port")

    @property
    def ssl_bootstrap_servers(self) -> str:
        """``"host:port"`` of the SSL listener; DevKafkaError if there is none."""
        return self._endpoint("SSL", self.ssl_port, "ssl_port")

    @property
    def sasl_ssl_bootstrap_servers(self) -> str:
        """``"host:port"`` of the SASL_SSL listener; DevKafkaError if there is none."""
        return self._endpoint("SASL_SSL", self.sasl_ssl_port, "sasl_ssl_port")

    def _endpoint(self, protocol: str, port: int | None, argument: str) -> str:
        if port is None:
            raise DevKafkaError(f"this broker has no {protocol} listener (no {argument} given)")
        return f"{self.host}:{port}"

    @property
    def tls_dir(self) -> Path:
        """Directory of the generated CA, broker and client certificates (with TLS only)."""
        return self.data_dir / _TLS_DIR_NAME

    @property
    def ssl_cafile(self) -> Path:
        """PEM file of the CA that signed the broker certificate, for clients to verify it.

        Exists once an SSL or SASL_SSL listener was prepared (first :meth:`start`).
        """
        return self.tls_dir / "ca.pem"

    @property
    def ssl_client_certfile(self) -> Path:
        """PEM client certificate signed by the CA (CN ``devkafka-client``), for mutual TLS."""
        return self.tls_dir / "client.pem"

    @property
    def ssl_client_keyfile(self) -> Path:
        """Unencrypted PKCS#8 PEM private key of :attr:`ssl_client_certfile`."""
        return self.tls_dir / "client.key"

    @property
    def _uses_tls(self) -> bool:
        return self.ssl_port is not None or self.sasl_ssl_port is not None

    @property
    def _uses_sasl(self) -> bool:
        return self.sasl_port is not None or self.sasl_ssl_port is not None

    @property
    def pid(self) -> int | None:
        """Pid of the broker JVM started by this object (None before the first start)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the JVM started by this object is alive (not necessarily serving)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def config_path(self) -> Path:
        """The generated ``server.properties``."""
        return self.data_dir / "server.properties"

    @property
    def log_path(self) -> Path:
        """The broker's log4j2 log file."""
        return self.data_dir / "logs" / "server.log"

    @property
    def console_log_path(self) -> Path:
        """The JVM's stdout/stderr file."""
        return self.data_dir / "broker.log"

    @property
    def log_dir(self) -> Path:
        """``log.dirs``: KRaft metadata log and partition data."""
        return self.data_dir / _LOG_DIR_NAME

    @property
    def formatted(self) -> bool:
        """True once the storage has been formatted (``meta.properties`` exists)."""
        return (self.log_dir / "meta.properties").is_file()

    def is_serving(self, timeout_s: float = 2.0) -> bool:
        """True if this node answers metadata requests and is listed as a live broker."""
        return is_serving(self.host, self.port, node_id=self.node_id, timeout_s=timeout_s)

    # -------------------------------------------------------------------- control

    def start(self, timeout_s: float = 90.0) -> None:
        """Start the broker and return once it serves clients.

        Resolves the jars first (:func:`ensure_jars`; not counted in ``timeout_s``),
        formats the storage if ``data_dir`` is new, writes ``server.properties`` and
        the log4j2 config, spawns the JVM in its own process group (stdout/stderr to
        ``data_dir/broker.log``) and polls the client port with a metadata request.
        ``timeout_s`` (seconds, default 90) covers formatting plus start-up.

        Raises :class:`DevKafkaError`, with the tail of the broker logs, if the port is
        taken, the JVM exits, or it does not serve within ``timeout_s`` (the JVM is
        killed in those last two cases).  A no-op if already running.
        """
        if self.running:
            return
        libs = ensure_jars(self.cache_dir)
        started = time.monotonic()
        self.spawn(libs, timeout_s=timeout_s)
        self.wait_until_serving(timeout_s=max(1.0, timeout_s - (time.monotonic() - started)))
        log.info(
            "Kafka %s node %d serving on %s after %.1f s (data: %s)",
            KAFKA_VERSION,
            self.node_id,
            self.bootstrap_servers,
            time.monotonic() - started,
            self.data_dir,
        )

    def spawn(self, libs: Path | None = None, *, timeout_s: float = 90.0) -> None:
        """Format if needed and launch the JVM without waiting for it to serve.

        Building block of :meth:`start` (and of cluster start, where all nodes must be
        launched before any can serve).  ``timeout_s`` bounds the storage format step.
        """
        if self.running:
            return
        if libs is None:
            libs = ensure_jars(self.cache_dir)
        self.prepare(libs, timeout_s=timeout_s)
        self._launch(libs)

    def prepare(self, libs: Path, *, timeout_s: float = 90.0) -> None:
        """Pick ports, check they are free, write the configs and format if not yet done.

        ``timeout_s`` bounds the storage format step (seconds).  Thread-safe for
        distinct nodes, so a cluster formats its nodes in parallel.
        """
        java = find_java()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        state = self._load_state()
        if self.controller_port is None:
            stored = state.get("controller_port")
            if isinstance(stored, int) and _port_is_free(self.host, stored):
                self.controller_port = stored
            else:
                self.controller_port = free_port(self.host)
        ports = {
            "port": self.port,
            "controller port": self.controller_port,
            "SASL_PLAINTEXT port": self.sasl_port,
            "SSL port": self.ssl_port,
            "SASL_SSL port": self.sasl_ssl_port,
        }
        used = [number for number in ports.values() if number is not None]
        if len(set(used)) != len(used):
            raise DevKafkaError(f"cannot start Kafka: listener ports must differ: {ports}")
        for name, number in ports.items():
            if number is not None and not _port_is_free(self.host, number):
                raise DevKafkaError(
                    f"cannot start Kafka: {name} {self.host}:{number} is already in use"
                )
        if self._uses_tls:
            ensure_tls_material(self.tls_dir, self.host)
        self._write_configs()
        scram_users = self.sasl_users if self._uses_sasl else {}
        if not self.formatted:
            cluster_id = self._cluster_id or state_cluster_id(state) or random_cluster_id()
            self._format(java, libs, cluster_id, timeout_s, scram_users)
            state["cluster_id"] = cluster_id
            state["scram_users_sha256"] = _credentials_digest(scram_users)
        elif scram_users and state.get("scram_users_sha256") != _credentials_digest(scram_users):
            log.warning(
                "%s was formatted without these SASL users, so SCRAM logins of %s will fail "
                "(PLAIN works); SCRAM users are only set when a data dir is first formatted",
                self.data_dir,
                ", ".join(sorted(scram_users)),
            )
        state.update(
            {
                "kafka_version": KAFKA_VERSION,
                "node_id": self.node_id,
                "port": self.port,
                "controller_port": self.controller_port,
                "sasl_port": self.sasl_port,
                "ssl_port": self.ssl_port,
                "sasl_ssl_port": self.sasl_ssl_port,
                "host": self.host,
            }
        )
        (self.data_dir / _STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")

    def _launch(self, libs: Path) -> None:
        java = find_java()
        cmd = [
            java,
            *self._jvm_flags(),
            "-cp",
            str(libs / "*"),
            "kafka.Kafka",
            str(self.config_path),
        ]
        preexec: Callable[[], None] | None = None
        if self.die_with_parent and threading.current_thread() is threading.main_thread():
            # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only
            # safe from the main thread; elsewhere the atexit hook below has to do.
            preexec = _die_with_parent_hook(os.getpid())
        self._log_offsets = {
            path: _file_size(path) for path in (self.log_path, self.console_log_path)
        }
        console = self.console_log_path.open("ab")
        try:
            console.write(f"\n=== devkafka: starting {' '.join(cmd)}\n".encode())
            console.flush()
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )
        finally:
            console.close()
        if self.die_with_parent:
            _OWNED.add(self._proc)
        log.info(
            "spawned Kafka %s node %d (pid %d) on %s, controller %s:%d",
            KAFKA_VERSION,
            self.node_id,
            self._proc.pid,
            self.bootstrap_servers,
            self.host,
            self.controller_port,
        )

    def wait_until_serving(self, timeout_s: float = 90.0) -> None:
        """Poll until this node serves clients; kill it and raise on death or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                code = self._proc.returncode
                raise DevKafkaError(
                    f"Kafka node {self.node_id} exited with code {code} during start-up\n"
                    + self._log_tails()
                )
            if self.is_serving(timeout_s=2.0):
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise DevKafkaError(
                    f"Kafka node {self.node_id} did not serve on {self.bootstrap_servers} "
                    f"within {timeout_s:.0f} s (killed it)\n" + self._log_tails()
                )
            time.sleep(_POLL_INTERVAL_S)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful stop: SIGTERM, wait up to ``timeout_s`` seconds, then SIGKILL.

        Data is kept; :meth:`start` again resumes on the same ``data_dir``.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning(
                "Kafka node %d ignored SIGTERM for %.0f s, killing it", self.node_id, timeout_s
            )
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.info("Kafka node %d stopped (exit %s)", self.node_id, proc.returncode)

    def kill(self) -> None:
        """Hard crash: SIGKILL the JVM (and its process group) and reap it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.info("Kafka node %d killed", self.node_id)

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"LocalKafka(node_id={self.node_id}, bootstrap_servers={self.bootstrap_servers!r}, "
            f"data_dir={str(self.data_dir)!r}, pid={self.pid})"
        )

    # ------------------------------------------------------------------ internals

    def _load_state(self) -> dict[str, Any]:
        try:
            loaded = json.loads((self.data_dir / _STATE_NAME).read_text())
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def properties(self) -> dict[str, str]:
        """The ``server.properties`` entries this node runs with."""
        host, cport = self.host, self.controller_port
        # Client listeners are named after their security protocol.
        client = [("PLAINTEXT", self.port)] + [
            (name, port)
            for name, port in (
                ("SASL_PLAINTEXT", self.sasl_port),
                ("SSL", self.ssl_port),
                ("SASL_SSL", self.sasl_ssl_port),
            )
            if port is not None
        ]
        advertised = ",".join(f"{name}://{host}:{port}" for name, port in client)
        protocols = ",".join(f"{name}:{name}" for name, _ in client)
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "listeners": f"{advertised},CONTROLLER://{host}:{cport}",
            "advertised.listeners": advertised,
            "listener.security.protocol.map": f"{protocols},CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.log_dir),
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # A broker restarted after SIGKILL cannot re-register until its old session
            # expires (default 9 s); keep that short for crash tests.
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "500",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "log.retention.hours": "168",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        if self._static_voters is not None:
            props["controller.quorum.voters"] = self._static_voters
        else:
            props["controller.quorum.bootstrap.servers"] = f"{host}:{cport}"
        if self._uses_sasl:
            props["sasl.enabled.mechanisms"] = ",".join(SASL_MECHANISMS)
        for name, port in client:
            if port is not None and name.startswith("SASL"):
                props.update(self._sasl_properties(name.lower()))
            if port is not None and name.endswith("SSL"):
                props.update(self._ssl_properties(name.lower()))
        props.update(self.extra_properties)
        return props

    def _sasl_properties(self, listener: str) -> dict[str, str]:
        """SASL server settings of listener ``listener`` (lower case, as Kafka wants it)."""
        prefix = f"listener.name.{listener}."
        plain_users = " ".join(
            f'user_{name}="{password}"' for name, password in self.sasl_users.items()
        )
        props = {
            prefix + "sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
            prefix + "plain.sasl.jaas.config": (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};"
            ),
        }
        for mechanism in SASL_MECHANISMS:
            if mechanism.startswith("SCRAM"):
                props[prefix + f"{mechanism.lower()}.sasl.jaas.config"] = (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                )
        return props

    def _ssl_properties(self, listener: str) -> dict[str, str]:
        """TLS server settings of listener ``listener``: inline PEM key, chain and CA."""
        prefix = f"listener.name.{listener}."
        chain = (self.tls_dir / "broker.pem").read_text() + self.ssl_cafile.read_text()
        return {
            prefix + "ssl.keystore.type": "PEM",
            prefix + "ssl.keystore.certificate.chain": chain,
            prefix + "ssl.keystore.key": (self.tls_dir / "broker.key").read_text(),
            prefix + "ssl.truststore.type": "PEM",
            prefix + "ssl.truststore.certificates": self.ssl_cafile.read_text(),
            prefix + "ssl.client.auth": self.ssl_client_auth,
        }

    def _write_configs(self) -> None:
        lines = [f"# Generated by devkafka (Kafka {KAFKA_VERSION}) on every start; edits are lost."]
        lines += [f"{key}={_escape_property(value)}" for key, value in self.properties().items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        log_file = self.log_path
        log4j = f"""\
# Generated by devkafka on every start.
status = warn
name = devkafka
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.filePattern = {log_file}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""
        (self.data_dir / "log4j2.properties").write_text(log4j)

    def _jvm_flags(self) -> list[str]:
        return [
            f"-Xmx{self.heap_mb}m",
            f"-Xms{min(self.heap_mb, 128)}m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.data_dir / 'logs'}",
            *self.jvm_args,
        ]

    def _format(
        self,
        java: str,
        libs: Path,
        cluster_id: str,
        timeout_s: float,
        scram_users: Mapping[str, str],
    ) -> None:
        cmd = [
            java,
            "-Xmx256m",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            str(libs / "*"),
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(self.config_path),
        ]
        if self._static_voters is None:
            cmd.append("--standalone")
        for mechanism in SASL_MECHANISMS:
            if mechanism.startswith("SCRAM"):
                for name, password in scram_users.items():
                    cmd += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        log.info("formatting KRaft storage in %s (cluster id %s)", self.log_dir, cluster_id)
        try:
            proc = subprocess.run(
                cmd,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise DevKafkaError(
                f"formatting Kafka storage timed out after {timeout_s:.0f} s"
            ) from exc
        if proc.returncode != 0 or not self.formatted:
            raise DevKafkaError(
                f"formatting Kafka storage in {self.log_dir} failed (exit {proc.returncode}):\n"
                + proc.stdout.strip()
            )

    def _log_tails(self) -> str:
        parts = []
        for path in (self.log_path, self.console_log_path):
            tail = _tail(path, start=self._log_offsets.get(path, 0))
            if tail:
                parts.append(f"--- last lines of {path} ---\n{tail}")
        if not parts:
            return f"(nothing logged; see {self.log_path} and {self.console_log_path})"
        return "\n".join(parts)


def state_cluster_id(state: Mapping[str, Any]) -> str | None:
    """The cluster id recorded in a ``devkafka.json`` mapping, if any."""
    value = state.get("cluster_id")
    return value if isinstance(value, str) and value else None


# ------------------------------------------------------------------ multi-node


class LocalKafkaCluster:
    """N local Kafka nodes, each broker + controller, with a static quorum of all N.

    For broker-failure tests.  Keyword-only arguments:

    * ``data_dir``: parent directory; node ``i`` (node.id ``i + 1``) uses
      ``data_dir/node-<i+1>``.  Reusing it keeps data, ports and cluster id.
    * ``nodes``: number of nodes (default 3; 3 tolerates one node down).
    * ``host``: bind/advertised address (default ``127.0.0.1``).
    * ``heap_mb``: per-node JVM max heap in MiB (default 384).
    * ``replication_factor``: default and internal-topic replication factor
      (default ``min(3, nodes)``); ``min.insync.replicas`` defaults to
      ``max(1, replication_factor - 1)`` so one node may be down.
    * ``extra_properties``, ``cache_dir``, ``die_with_parent``: as for :class:`LocalKafka`.

    Client and controller ports are picked free on first start and reused later.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        nodes: int = 3,
        host: str = "127.0.0.1",
        heap_mb: int = 384,
        replication_factor: int | None = None,
        min_insync_replicas: int | None = None,
        extra_properties: Mapping[str, str] | None = None,
        cache_dir: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.data_dir: Path = Path(data_dir).expanduser().resolve()
        self.host: str = host
        self.cache_dir: Path | None = cache_dir
        rf = replication_factor if replication_factor is not None else min(3, nodes)
        isr = min_insync_replicas if min_insync_replicas is not None else max(1, rf - 1)
        self.replication_factor: int = rf
        self.min_insync_replicas: int = isr
        layout = self._load_layout(nodes)
        voters = ",".join(f"{i + 1}@{host}:{cport}" for i, (_, cport) in enumerate(layout["ports"]))
        props = {
            "default.replication.factor": str(rf),
            "min.insync.replicas": str(isr),
            "offsets.topic.replication.factor": str(rf),
            "transaction.state.log.replication.factor": str(rf),
            "transaction.state.log.min.isr": str(isr),
            "share.coordinator.state.topic.replication.factor": str(rf),
            "share.coordinator.state.topic.min.isr": str(isr),
        }
        props.update(extra_properties or {})
        self._nodes: list[LocalKafka] = []
        for index, (port, cport) in enumerate(layout["ports"]):
            node = LocalKafka(
                data_dir=self.data_dir / f"node-{index + 1}",
                port=port,
                controller_port=cport,
                host=host,
                heap_mb=heap_mb,
                extra_properties=props,
                cache_dir=cache_dir,
                die_with_parent=die_with_parent,
            )
            node.node_id = index + 1
            node._static_voters = voters
            node._cluster_id = layout["cluster_id"]
            self._nodes.append(node)

    def _load_layout(self, nodes: int) -> dict[str, Any]:
        path = self.data_dir / "cluster.json"
        try:
            layout = json.loads(path.read_text())
            if isinstance(layout, dict) and len(layout.get("ports", [])) == nodes:
                layout["ports"] = [tuple(pair) for pair in layout["ports"]]
                return layout
        except (OSError, ValueError):
            pass
        ports: list[int] = []
        with contextlib.ExitStack() as stack:  # hold all sockets so the ports differ
            for _ in range(2 * nodes):
                sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.bind((self.host, 0))
                ports.append(sock.getsockname()[1])
        layout = {
            "cluster_id": random_cluster_id(),
            "ports": [(ports[2 * i], ports[2 * i + 1]) for i in range(nodes)],
        }
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(layout, indent=2) + "\n")
        return layout

    @property
    def nodes(self) -> list[LocalKafka]:
        """All nodes; ``nodes[i]`` has node.id ``i + 1``."""
        return list(self._nodes)

    def node(self, i: int) -> LocalKafka:
        """Node at 0-based index ``i`` (node.id ``i + 1``), for per-node stop/kill/start."""
        return self._nodes[i]

    @property
    def bootstrap_servers(self) -> str:
        """Comma-separated ``host:port`` of every node's client listener."""
        return ",".join(node.bootstrap_servers for node in self._nodes)

    def start(self, timeout_s: float = 120.0) -> None:
        """Start all nodes that are not running and wait until every one serves.

        All JVMs are launched before waiting, since none can serve until the controller
        quorum has a majority.  ``timeout_s`` (seconds) covers formatting and start-up.
        """
        libs = ensure_jars(self.cache_dir)
        deadline = time.monotonic() + timeout_s
        try:
            todo = [node for node in self._nodes if not node.running]
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(todo) or 1) as pool:
                for future in [pool.submit(n.prepare, libs, timeout_s=timeout_s) for n in todo]:
                    future.result()
            for node in todo:  # launched from this thread (see die_with_parent)
                node._launch(libs)
            for node in self._nodes:
                node.wait_until_serving(timeout_s=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every node at once, wait up to ``timeout_s`` seconds, SIGKILL leftovers."""
        for node in self._nodes:
            if node.running and node.pid is not None:
                _signal_group(node.pid, signal.SIGTERM)
        for node in self._nodes:
            node.stop(timeout_s=timeout_s)

    def kill(self) -> None:
        """SIGKILL every node."""
        for node in self._nodes:
            node.kill()

    def __enter__(self) -> LocalKafkaCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
