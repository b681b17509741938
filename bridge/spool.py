"""The local durable spool: where a record goes when Kafka does not acknowledge it in time.

The webhook answers 200 only once a record is safe. When Kafka is slow or down, "safe" means
appended to this spool and fsynced; a drainer later publishes the spooled records to Kafka,
oldest first, and acknowledges them here.

Layout (see ``docs/spool-format.md`` for the exact bytes): a directory of append-only segment
files ``<20-digit id>.seg``; every record is framed with a magic byte, its length and a CRC32
of its payload. The module has two layers:

* a pure core (:func:`encode_frame`, :func:`decode_frame`, :func:`scan_frames`) that turns
  records into bytes and bytes back into records, resynchronising past damaged bytes;
* :class:`Spool`, the I/O shell: group commit of concurrent appends (one write and one fsync
  per batch, in a worker thread), a read cursor for the drainer, an atomically replaced
  checkpoint of the acknowledged position, and recovery when it opens.

Damaged bytes never stop the spool: they are copied into ``<directory>/corrupt/``, counted,
logged (without their contents) and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import logging
import os
import re
import stat
import struct
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from bridge.errors import WifiBridgeError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES: Final = 1 << 30  # 1 GiB
DEFAULT_SEGMENT_BYTES: Final = 16 << 20  # 16 MiB
#: How long a segment may stay unreadable (an I/O error on every try) before it is moved into
#: ``corrupt/`` whole, so that the records behind it are drained; at least this many tries.
DEFAULT_UNREADABLE_SET_ASIDE_S: Final = 300.0
_UNREADABLE_MIN_TRIES: Final = 3
#: Read errors that say nothing about the file (the process or the system is short of file
#: descriptors or memory): they never count towards moving a segment aside.
_NOT_THE_FILE: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR}
)

FORMAT_VERSION: Final = 1
#: 0xF5 never occurs in UTF-8 text, and spooled values are JSON, so a resync scan rarely
#: stops on a false start inside a payload.
MAGIC: Final = 0xF5
_MAGIC_BYTE: Final = bytes([MAGIC])
# magic (u8), payload length (u32), CRC32 of the payload (u32); big-endian like Kafka.
_FRAME_HEADER: Final = struct.Struct(">BII")
FRAME_HEADER_BYTES: Final = _FRAME_HEADER.size
# version (u8), spooled_at_ms (i64), topic length (u16)
_PAYLOAD_HEAD: Final = struct.Struct(">BqH")
_I32: Final = struct.Struct(">i")
_I64: Final = struct.Struct(">q")
_U32: Final = struct.Struct(">I")
_U16: Final = struct.Struct(">H")
# version + spooled_at_ms + topic length + key length + value length + header count
_MIN_PAYLOAD_BYTES: Final = _PAYLOAD_HEAD.size + 4 + 4 + 2
#: A length field above this is damage, not a record: it bounds what a resync reads.
MAX_PAYLOAD_BYTES: Final = 1 << 30

_SEGMENT_NAME: Final = re.compile(r"^(\d{20})\.seg$")
_CHECKPOINT_NAME: Final = "checkpoint"
_LOCK_NAME: Final = "lock"
_CORRUPT_DIR: Final = "corrupt"
_CHECKPOINT: Final = struct.Struct(">4sBQQ")
_CHECKPOINT_MAGIC: Final = b"WBSC"

_READ_CHUNK_BYTES: Final = 256 << 10
_SCAN_CHUNK_BYTES: Final = 1 << 20
_COPY_CHUNK_BYTES: Final = 1 << 20
# Bounds the bytes joined in memory for one write; a busier queue just takes another round.
_MAX_BATCH_BYTES: Final = 8 << 20


class SpoolUnavailable(WifiBridgeError):
    """The spool cannot keep a record now (disk full, read-only, I/O error, closed)."""

    http_status = 503
    code = "spool_unavailable"
    retryable = True


class SpoolFull(SpoolUnavailable):
    """Keeping the record would take the spool past its ``max_bytes``."""

    code = "spool_full"


# --------------------------------------------------------------------------------------------
# Pure core: records <-> bytes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One record waiting for Kafka: what the producer would have sent, and when it was spooled.

    ``key`` may be ``None`` (no key) or empty (an empty key); both survive the round trip.
    ``spooled_at_ms`` is wall-clock epoch milliseconds, chosen by the caller.
    """

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    spooled_at_ms: int


def encode_frame(record: SpoolRecord) -> bytes:
    """The framed bytes of ``record`` as they are written to a segment.

    Raises ``ValueError`` when a field does not fit the format (a topic or header name over
    65535 UTF-8 bytes, more than 65535 headers, a payload over :data:`MAX_PAYLOAD_BYTES`).
    """
    payload = _encode_payload(record)
    return _FRAME_HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _encode_payload(record: SpoolRecord) -> bytes:
    topic = record.topic.encode()
    if len(topic) > 0xFFFF:
        raise ValueError("topic is longer than 65535 bytes")
    if len(record.headers) > 0xFFFF:
        raise ValueError("a record has more than 65535 headers")
    try:
        parts = [_PAYLOAD_HEAD.pack(FORMAT_VERSION, record.spooled_at_ms, len(topic)), topic]
    except struct.error as exc:
        raise ValueError(f"spooled_at_ms does not fit in 64 bits: {exc}") from None
    if record.key is None:
        parts.append(_I32.pack(-1))
    else:
        if len(record.key) > 0x7FFFFFFF:
            raise ValueError("key is longer than 2 GiB")
        parts += [_I32.pack(len(record.key)), record.key]
    parts += [_U32.pack(len(record.value)), record.value, _U16.pack(len(record.headers))]
    for name, value in record.headers:
        raw_name = name.encode()
        if len(raw_name) > 0xFFFF:
            raise ValueError("header name is longer than 65535 bytes")
        parts += [_U16.pack(len(raw_name)), raw_name, _U32.pack(len(value)), value]
    payload = b"".join(parts)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"record is larger than {MAX_PAYLOAD_BYTES} bytes")
    return payload


class _Malformed(ValueError):
    """A payload whose CRC matched but whose fields do not parse (or a newer version)."""


def _decode_payload(payload: memoryview) -> SpoolRecord:
    try:
        version, spooled_at_ms, topic_len = _PAYLOAD_HEAD.unpack_from(payload, 0)
        if version != FORMAT_VERSION:
            raise _Malformed(f"unknown format version {version}")
        pos = _PAYLOAD_HEAD.size
        topic = str(payload[pos : pos + topic_len], "utf-8")
        pos += topic_len
        (key_len,) = _I32.unpack_from(payload, pos)
        pos += 4
        key: bytes | None = None
        if key_len >= 0:
            key = _take(payload, pos, key_len)
            pos += key_len
        elif key_len != -1:
            raise _Malformed("negative key length")
        (value_len,) = _U32.unpack_from(payload, pos)
        pos += 4
        value = _take(payload, pos, value_len)
        pos += value_len
        (count,) = _U16.unpack_from(payload, pos)
        pos += 2
        headers: list[tuple[str, bytes]] = []
        for _ in range(count):
            (name_len,) = _U16.unpack_from(payload, pos)
            pos += 2
            name = str(_take(payload, pos, name_len), "utf-8")
            pos += name_len
            (header_len,) = _U32.unpack_from(payload, pos)
            pos += 4
            headers.append((name, _take(payload, pos, header_len)))
            pos += header_len
    except (struct.error, UnicodeDecodeError) as exc:
        raise _Malformed(str(exc)) from None
    if pos != len(payload):
        raise _Malformed("trailing bytes after the last header")
    return SpoolRecord(
        topic=topic, key=key, value=value, headers=headers, spooled_at_ms=spooled_at_ms
    )


def _take(payload: memoryview, pos: int, length: int) -> bytes:
    if pos + length > len(payload):
        raise _Malformed("a field runs past the end of the payload")
    return bytes(payload[pos : pos + length])


@dataclass(frozen=True, slots=True)
class Frame:
    """A valid record found at bytes ``[start, end)`` of a segment."""

    start: int
    end: int
    record: SpoolRecord


@dataclass(frozen=True, slots=True)
class Gap:
    """Damaged bytes ``[start, end)`` of a segment, and why they were not a record.

    ``reason`` is one of ``bad_magic``, ``bad_length`` (a length that runs past the data or
    out of bounds), ``crc_mismatch``, ``bad_payload`` (CRC fine, fields do not parse, or an
    unknown format version) or ``truncated`` (an incomplete record with nothing valid after
    it: the torn tail a crash leaves behind).
    """

    start: int
    end: int
    reason: str


@dataclass(frozen=True, slots=True)
class _NeedMore:
    """The buffer ends before the item at ``start`` is decided; ``needed_bytes`` from it do."""

    start: int
    needed_bytes: int


@dataclass(frozen=True, slots=True)
class _Incomplete:
    needed_bytes: int


def _frame_at(
    buf: bytes, view: memoryview, pos: int
) -> tuple[SpoolRecord, int] | _Incomplete | str:
    """The record at ``pos`` and its end, how many bytes it needs, or why it is not a record."""
    available = len(buf) - pos
    if buf[pos] != MAGIC:
        return "bad_magic"
    if available < FRAME_HEADER_BYTES:
        return _Incomplete(FRAME_HEADER_BYTES)
    _, length, crc = _FRAME_HEADER.unpack_from(buf, pos)
    if not _MIN_PAYLOAD_BYTES <= length <= MAX_PAYLOAD_BYTES:
        return "bad_length"
    end = pos + FRAME_HEADER_BYTES + length
    if end > len(buf):
        return _Incomplete(FRAME_HEADER_BYTES + length)
    payload = view[pos + FRAME_HEADER_BYTES : end]
    if zlib.crc32(payload) != crc:
        return "crc_mismatch"
    try:
        return _decode_payload(payload), end
    except _Malformed:
        return "bad_payload"


def _next_item(
    buf: bytes, view: memoryview, pos: int, *, at_end: bool, base: int = 0
) -> Frame | Gap | _NeedMore:
    """The frame or gap starting at ``pos`` of ``buf``, at file offsets ``base + position``.

    ``at_end`` says ``buf`` reaches the end of the readable data, so an incomplete frame is
    damage rather than a reason to read more. With ``at_end`` the answer is never
    :class:`_NeedMore`, which is what guarantees a scan always makes progress.
    """
    found = _frame_at(buf, view, pos)
    if isinstance(found, tuple):
        return Frame(base + pos, base + found[1], found[0])
    if isinstance(found, _Incomplete):
        if not at_end:
            return _NeedMore(base + pos, found.needed_bytes)
        reason = "truncated"
    else:
        reason = found
    # Resynchronise: the next offset holding a complete, CRC-valid frame ends the gap.
    candidate = pos + 1
    while True:
        candidate = buf.find(_MAGIC_BYTE, candidate)
        if candidate < 0:
            if not at_end:
                return _NeedMore(base + pos, len(buf) - pos + 1)
            return Gap(base + pos, base + len(buf), reason)
        probe = _frame_at(buf, view, candidate)
        if isinstance(probe, tuple):
            # A record follows, so an over-long length was damage, not a torn tail.
            reason = "bad_length" if reason == "truncated" else reason
            return Gap(base + pos, base + candidate, reason)
        if isinstance(probe, _Incomplete) and not at_end:
            return _NeedMore(base + pos, candidate - pos + probe.needed_bytes)
        candidate += 1


def scan_frames(data: bytes, *, base_offset: int = 0) -> list[Frame | Gap]:
    """Every frame and gap in ``data``, a complete segment (or its tail from a frame start).

    Offsets are ``base_offset`` plus the position in ``data``. The items cover ``data``
    without overlap or hole, so a caller can account for every byte.
    """
    view = memoryview(data)
    items: list[Frame | Gap] = []
    pos = 0
    while pos < len(data):
        item = _next_item(data, view, pos, at_end=True, base=base_offset)
        assert not isinstance(item, _NeedMore)
        items.append(item)
        pos = item.end - base_offset
    return items


def decode_frame(data: bytes) -> SpoolRecord:
    """The record framed in ``data``, which must hold exactly one valid frame.

    Raises ``ValueError`` naming the damage otherwise.
    """
    if not data:
        raise ValueError("no frame: empty input")
    items = scan_frames(data)
    first = items[0]
    if isinstance(first, Gap):
        raise ValueError(f"not a valid frame: {first.reason}")
    if len(items) > 1:
        raise ValueError("trailing bytes after the frame")
    return first.record


@dataclass(frozen=True, slots=True)
class _Run:
    """``records`` valid frames back to back in ``[start, end)``, counted but not decoded."""

    start: int
    end: int
    records: int
    first_spooled_at_ms: int


def _count_step(
    buf: bytes, view: memoryview, pos: int, *, at_end: bool, base: int = 0
) -> _Run | Frame | Gap | _NeedMore:
    """Like :func:`_next_item`, but a run of valid frames comes back as one :class:`_Run`.

    Opening a spool counts every pending record; checking magic, length, CRC and version
    without building records keeps that fast (decoding the fields cost two thirds of the
    time). A frame whose fields do not parse despite its CRC is left for the reader to
    set aside.
    """
    count = first_ts = 0
    start = pos
    while pos + FRAME_HEADER_BYTES <= len(buf):
        magic, length, crc = _FRAME_HEADER.unpack_from(buf, pos)
        if magic != MAGIC or not _MIN_PAYLOAD_BYTES <= length <= MAX_PAYLOAD_BYTES:
            break
        payload = pos + FRAME_HEADER_BYTES
        end = payload + length
        if end > len(buf) or buf[payload] != FORMAT_VERSION:
            break
        if zlib.crc32(view[payload:end]) != crc:
            break
        if not count:
            (first_ts,) = _I64.unpack_from(buf, payload + 1)
        count += 1
        pos = end
    if count:
        return _Run(base + start, base + pos, count, first_ts)
    return _next_item(buf, view, pos, at_end=at_end, base=base)


# --------------------------------------------------------------------------------------------
# Public value types of the shell
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class SpoolPosition:
    """A place in the spool: every record before it (in read order) is before it."""

    segment_id: int
    offset: int


@dataclass(frozen=True, slots=True)
class SpooledEntry:
    """A record read from the spool and where it lies: bytes ``[offset, end_offset)``."""

    record: SpoolRecord
    segment_id: int
    offset: int
    end_offset: int

    @property
    def position(self) -> SpoolPosition:
        return SpoolPosition(self.segment_id, self.offset)


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """A snapshot of the spool, cheap to take (kept as counters, no rescan).

    ``records``: records appended or found at open and not yet acknowledged.
    ``bytes``: bytes of the segment files (acknowledged bytes count until their segment goes).
    ``segments``: segment files. ``oldest_spooled_at_ms``: ``spooled_at_ms`` of the oldest
    record not yet acknowledged, ``None`` when there is none; right after an acknowledgement
    and before the next read it may be that of the last acknowledged record (never younger
    than the truth). ``corrupt_records`` / ``corrupt_bytes``: damaged regions (each may have
    held one or more records) and their bytes set aside since this process opened the spool.
    ``unreadable_segments``: segment files that could not be read when last tried (an I/O
    error), kept to be read again; one found so at open has its records missing from
    ``records``, since they could not be counted.
    """

    records: int
    bytes: int
    segments: int
    oldest_spooled_at_ms: int | None
    corrupt_records: int
    corrupt_bytes: int
    unreadable_segments: int = 0


# --------------------------------------------------------------------------------------------
# Blocking helpers (run in a worker thread, or offline)
# --------------------------------------------------------------------------------------------


#: How many items a read may hold past the committed position, in batches of the read's size.
_READ_AHEAD_FACTOR = 4


def _segment_name(segment_id: int) -> str:
    return f"{segment_id:020d}.seg"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, "write made no progress")
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Span(Protocol):
    @property
    def end(self) -> int: ...


_Item = TypeVar("_Item", bound=_Span)
_T = TypeVar("_T")


def _iter_items(
    fd: int, start: int, limit: int, *, chunk_bytes: int, step: Callable[..., _Item | _NeedMore]
) -> Iterator[_Item]:
    """What ``step`` finds in the open segment ``fd`` from ``start`` up to ``limit``, lazily.

    Memory is one chunk, grown only while a frame (or a resync) needs more, and never past
    ``limit``; once a read reaches ``limit`` every byte is decided, so the loop ends.
    """
    pos = start
    want = chunk_bytes
    while pos < limit:
        asked = min(want, limit - pos)
        buf = os.pread(fd, asked, pos)
        if not buf:
            return  # the file is shorter than we were told: nothing more to read
        at_end = pos + len(buf) >= limit or len(buf) < asked
        view = memoryview(buf)
        used = 0
        needed = 0
        while used < len(buf):
            item = step(buf, view, used, at_end=at_end, base=pos)
            if isinstance(item, _NeedMore):
                needed = item.needed_bytes
                break
            yield item
            used = item.end - pos
        pos += used
        want = max(chunk_bytes, needed) if used else max(want * 2, needed)


@dataclass(frozen=True, slots=True)
class _Incident:
    """A gap that was found, and whether (and where) its bytes were set aside."""

    segment_id: int
    start: int
    end: int
    reason: str
    saved_as: Path | None
    new: bool
    error: str | None = None


def _set_aside(fd: int, segment_id: int, gap: Gap, corrupt_dir: Path, *, fsync: bool) -> _Incident:
    """Copy the gap's bytes into ``corrupt_dir``; a file already there means "seen before"."""
    name = f"{segment_id:020d}_{gap.start:012d}-{gap.end:012d}_{gap.reason}.bin"
    path = corrupt_dir / name

    def incident(saved_as: Path | None, *, new: bool, error: str | None = None) -> _Incident:
        return _Incident(segment_id, gap.start, gap.end, gap.reason, saved_as, new, error)

    try:
        _make_corrupt_dir(corrupt_dir, fsync=fsync)
    except OSError as exc:
        return incident(None, new=True, error=f"{type(exc).__name__}: {exc.strerror}")
    if os.path.lexists(path):
        return incident(path, new=False)
    # Copied under a temporary name and renamed once complete and fsynced, then the directory
    # fsynced: a crash mid-copy leaves no file that looks like a whole copy, and a copy that
    # counts as made survives a power loss. (Only one process has the spool open.)
    partial_path = corrupt_dir / (name + ".partial")
    try:
        out = os.open(partial_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        return incident(None, new=True, error=f"{type(exc).__name__}: {exc.strerror}")
    try:
        try:
            pos = gap.start
            while pos < gap.end:
                chunk = os.pread(fd, min(_COPY_CHUNK_BYTES, gap.end - pos), pos)
                if not chunk:
                    break
                _write_all(out, chunk)
                pos += len(chunk)
            if fsync:
                os.fsync(out)
        finally:
            os.close(out)
        os.rename(partial_path, path)
        if fsync:
            _fsync_dir(corrupt_dir)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(partial_path)
        return incident(None, new=True, error=f"{type(exc).__name__}: {exc.strerror}")
    return incident(path, new=True)


def _make_corrupt_dir(corrupt_dir: Path, *, fsync: bool) -> None:
    """Create ``corrupt/`` if missing; its entry in the spool directory is fsynced."""
    if corrupt_dir.is_dir():
        return
    # Not "made" when corrupt/ is a file: mkdir raises FileExistsError for that too.
    corrupt_dir.mkdir(mode=0o700)
    if fsync:
        _fsync_dir(corrupt_dir.parent)


def _move_aside(directory: Path, segment_id: int, offset: int, *, fsync: bool) -> Path:
    """Move an unreadable segment into ``corrupt/`` whole; returns its new path.

    A rename: nothing of the file has to be read. ``offset`` is where its undelivered records
    begin (the bytes before it were delivered), and goes into the name.
    """
    corrupt_dir = directory / _CORRUPT_DIR
    _make_corrupt_dir(corrupt_dir, fsync=fsync)
    target = corrupt_dir / f"{segment_id:020d}_{offset:012d}-end_unreadable.seg"
    os.rename(directory / _segment_name(segment_id), target)
    if fsync:
        # The file is moved, whatever the flushes say. Unflushed, the move may not survive a
        # crash: the segment may be back in the spool (read or moved again), or, should the
        # next checkpoint's flush have gone through, missing from both directories. A disk
        # that fails to flush a directory is failing: that is said, not hidden.
        errors = []
        for flushed in (corrupt_dir, directory):
            try:
                _fsync_dir(flushed)
            except OSError as exc:
                errors.append(f"{flushed.name}: {type(exc).__name__}: {exc.strerror}")
        if errors:
            log.error(
                "moved an unreadable spool segment aside, but could not flush the directories; "
                "a crash now may lose it",
                extra={"segment_id": segment_id, "error": "; ".join(errors)},
            )
    return target


def _set_aside_record(
    path: Path, segment_id: int, span: Gap, corrupt_dir: Path, *, fsync: bool
) -> _Incident:
    """:func:`_set_aside` for the bytes of a valid record, given its segment's path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc.strerror}"
        return _Incident(segment_id, span.start, span.end, span.reason, None, True, error)
    try:
        return _set_aside(fd, segment_id, span, corrupt_dir, fsync=fsync)
    finally:
        os.close(fd)


def _read_checkpoint(directory: Path) -> SpoolPosition | None:
    """The committed position on disk, or ``None`` when absent or unreadable (resend is safe)."""
    try:
        data = (directory / _CHECKPOINT_NAME).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning(
            "spool checkpoint unreadable, resending from the oldest segment",
            extra={"error": type(exc).__name__},
        )
        return None
    if len(data) == _CHECKPOINT.size + 4:
        body, (crc,) = data[: _CHECKPOINT.size], _U32.unpack_from(data, _CHECKPOINT.size)
        magic, version, segment_id, offset = _CHECKPOINT.unpack(body)
        if magic == _CHECKPOINT_MAGIC and version == FORMAT_VERSION and zlib.crc32(body) == crc:
            return SpoolPosition(segment_id, offset)
    log.warning("spool checkpoint damaged, resending from the oldest segment")
    return None


def _write_checkpoint(directory: Path, position: SpoolPosition, *, fsync: bool) -> None:
    """Replace the checkpoint atomically: write a temporary file, fsync, rename, fsync dir."""
    body = _CHECKPOINT.pack(_CHECKPOINT_MAGIC, FORMAT_VERSION, position.segment_id, position.offset)
    data = body + _U32.pack(zlib.crc32(body))
    temporary = directory / (_CHECKPOINT_NAME + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, directory / _CHECKPOINT_NAME)
    if fsync:
        _fsync_dir(directory)


@dataclass(slots=True)
class _Segment:
    """What the shell knows about one segment file, kept so stats never rescan."""

    id: int
    size_bytes: int
    records: int = 0
    head_spooled_at_ms: int | None = None
    sealed: bool = True
    #: Could not be read at open: its records are not counted.
    unread: bool = False


@dataclass(slots=True)
class _Recovered:
    segments: list[_Segment]
    committed: SpoolPosition
    next_segment_id: int
    incidents: list[_Incident]


def _recover(directory: Path, *, read_only: bool, fsync: bool) -> _Recovered:
    """Scan a spool directory: count pending records, cut a torn tail, set damage aside.

    With ``read_only`` nothing on disk changes: no truncation, no deletion, no copies; the
    newest segment's incomplete tail is not counted as damage (a live writer may be mid-write).
    Damage never raises here; only failing to list the directory does (``OSError``).
    """
    checkpoint = _read_checkpoint(directory)
    committed = checkpoint or SpoolPosition(0, 0)
    with os.scandir(directory) as entries:
        ids = sorted(int(m.group(1)) for e in entries if (m := _SEGMENT_NAME.match(e.name)))
    # New segments must sort after anything a checkpoint may have passed, or they would be
    # treated as delivered at the next start.
    next_segment_id = max([committed.segment_id, *ids]) + 1
    corrupt_dir = directory / _CORRUPT_DIR
    segments: list[_Segment] = []
    incidents: list[_Incident] = []
    newest = ids[-1] if ids else None
    for segment_id in ids:
        path = directory / _segment_name(segment_id)
        if segment_id < committed.segment_id:
            if not read_only:
                _remove(path)
            continue
        try:
            scanned = _scan_segment(
                path,
                segment_id,
                start=committed.offset if segment_id == committed.segment_id else 0,
                is_newest=segment_id == newest,
                read_only=read_only,
                corrupt_dir=corrupt_dir,
                fsync=fsync,
            )
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc.strerror}"
            if not _may_be_segment(path):
                # A directory with a segment's name, say: nothing this spool wrote.
                log.error("not a spool segment file, skipped", extra={"file": path.name})
                continue
            # Unreadable now (an I/O error, too many open files): kept in the list, its records
            # uncounted, so the read cursor stops there and no checkpoint can pass it (which
            # would delete it unread at the next start). The drainer tries it again, and moves
            # it into corrupt/ if it stays unreadable.
            log.error(
                "spool segment unreadable; kept, to be read again",
                extra={"segment_id": segment_id, "error": error},
            )
            segments.append(_Segment(segment_id, _size_of(path), unread=True))
            continue
        segment, found = scanned
        incidents += found
        delivered = segment_id == committed.segment_id and committed.offset >= segment.size_bytes
        if not read_only and (segment.size_bytes == 0 or delivered):
            _remove(path)
            continue
        segments.append(segment)
    return _Recovered(segments, committed, next_segment_id, incidents)


def _may_be_segment(path: Path) -> bool:
    """False only for what is certainly no segment file (a directory, a socket)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def _size_of(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _scan_segment(
    path: Path,
    segment_id: int,
    *,
    start: int,
    is_newest: bool,
    read_only: bool,
    corrupt_dir: Path,
    fsync: bool,
) -> tuple[_Segment, list[_Incident]]:
    # Read-only descriptor: draining must still work on a file system remounted read-only.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if start > size:
            log.warning(
                "spool checkpoint is past the end of its segment",
                extra={"segment_id": segment_id, "offset": start, "size_bytes": size},
            )
            start = size
        segment = _Segment(segment_id, size)
        incidents: list[_Incident] = []
        for item in _iter_items(fd, start, size, chunk_bytes=_SCAN_CHUNK_BYTES, step=_count_step):
            if isinstance(item, _Run):
                records, first_ts = item.records, item.first_spooled_at_ms
            elif isinstance(item, Frame):
                records, first_ts = 1, item.record.spooled_at_ms
            if not isinstance(item, Gap):
                if segment.head_spooled_at_ms is None:
                    segment.head_spooled_at_ms = first_ts
                segment.records += records
                continue
            torn_tail = is_newest and item.end == size
            if read_only:
                if not torn_tail:
                    incidents.append(
                        _Incident(segment_id, item.start, item.end, item.reason, None, True)
                    )
                continue
            incidents.append(_set_aside(fd, segment_id, item, corrupt_dir, fsync=fsync))
            # A crash interrupted an append that was never acknowledged: cut it off so the
            # segment ends on a record boundary.
            if torn_tail and _truncate(path, item.start, fsync=fsync):
                segment.size_bytes = item.start
        return segment, incidents
    finally:
        os.close(fd)


def _truncate(path: Path, size_bytes: int, *, fsync: bool) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size_bytes)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        # The damaged tail stays; readers skip it like any other damage.
        log.warning(
            "could not cut the torn tail of a spool segment",
            extra={"file": path.name, "error": f"{type(exc).__name__}: {exc.strerror}"},
        )
        return False
    return True


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning(
            "could not delete a delivered spool segment",
            extra={"file": path.name, "error": f"{type(exc).__name__}: {exc.strerror}"},
        )


class _ReadItem(NamedTuple):
    entry: SpooledEntry | None
    incident: _Incident | None


@dataclass(slots=True)
class _ReadOutcome:
    items: list[_ReadItem]
    next_offset: int
    reached_end: bool
    missing: bool = False


def _read_segment(
    path: Path,
    segment_id: int,
    *,
    offset: int,
    limit: int | None,
    max_records: int,
    corrupt_dir: Path,
    fsync: bool,
) -> _ReadOutcome:
    """Up to ``max_records`` entries from ``offset``, and the gaps met on the way.

    ``limit`` is the durable end of the active segment; ``None`` reads a sealed one to its end.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return _ReadOutcome([], offset, reached_end=True, missing=True)
    try:
        size = os.fstat(fd).st_size
        end = size if limit is None else min(limit, size)
        items: list[_ReadItem] = []
        count = 0
        pos = offset
        found: Iterator[Frame | Gap]
        found = _iter_items(fd, offset, end, chunk_bytes=_READ_CHUNK_BYTES, step=_next_item)
        for item in found:
            if isinstance(item, Frame):
                entry = SpooledEntry(item.record, segment_id, item.start, item.end)
                items.append(_ReadItem(entry, None))
                count += 1
            else:
                incident = _set_aside(fd, segment_id, item, corrupt_dir, fsync=fsync)
                items.append(_ReadItem(None, incident))
            pos = item.end
            if count >= max_records:
                break
        return _ReadOutcome(items, pos, reached_end=pos >= end)
    finally:
        os.close(fd)


@dataclass(slots=True)
class _WriteOutcome:
    """What one batch did to the files; read by the event loop once the thread returns."""

    segment_id: int | None = None
    created: bool = False
    removed: bool = False
    sealed_id: int | None = None
    size_bytes: int = -1
    error: Exception | None = None


class _SegmentWriter:
    """The appending end: one open segment file, used by one worker thread at a time."""

    def __init__(self, *, directory: Path, fsync: bool) -> None:
        self._directory = directory
        self._fsync = fsync
        self._fd: int | None = None
        self._segment_id: int | None = None
        self._size = 0

    def write(self, frames: list[bytes], new_segment_id: int | None) -> _WriteOutcome:
        """Append ``frames`` (to a new segment when an id is given), fsync, report.

        Never raises: a failure is reported in the outcome after the segment is cut back to
        where the batch started and closed, so the next batch starts a clean segment.
        """
        outcome = _WriteOutcome()
        start = self._size
        try:
            if new_segment_id is not None:
                if self._fd is not None:
                    outcome.sealed_id = self._segment_id
                    self.close()
                self._create(new_segment_id)
                outcome.created = True
                start = 0
            if self._fd is None:
                raise RuntimeError("no segment open for appending")
            outcome.segment_id = self._segment_id
            data = b"".join(frames)
            _write_all(self._fd, data)
            self._size += len(data)
            if self._fsync:
                os.fsync(self._fd)
                if outcome.created:
                    _fsync_dir(self._directory)
            # Writing into a deleted file "succeeds" and loses the data: refuse it.
            if os.fstat(self._fd).st_nlink == 0:
                raise OSError(errno.ENOENT, "segment file was deleted while in use")
            outcome.size_bytes = self._size
        except Exception as exc:
            outcome.error = exc
            self._abandon(outcome, start)
        return outcome

    def _create(self, segment_id: int) -> None:
        path = self._directory / _segment_name(segment_id)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o600)
        self._segment_id = segment_id
        self._size = 0

    def _abandon(self, outcome: _WriteOutcome, start: int) -> None:
        if self._fd is None:
            return
        size = -1
        try:
            os.ftruncate(self._fd, start)
            size = start
        except OSError:
            with contextlib.suppress(OSError):
                size = os.fstat(self._fd).st_size
        if outcome.created and size == 0 and self._segment_id is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._directory / _segment_name(self._segment_id))
                outcome.removed = True
        outcome.size_bytes = size
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
        self._segment_id = None
        self._size = 0


# --------------------------------------------------------------------------------------------
# The spool
# --------------------------------------------------------------------------------------------


class _Kind(enum.Enum):
    RECORD = "record"
    GAP = "gap"  # damaged bytes the reader stepped over
    END = "end"  # the end of a sealed segment: once committed, the segment can go


@dataclass(slots=True)
class _InFlight:
    """An item the reader passed and the committed position has not: acknowledged or not."""

    kind: _Kind
    segment_id: int
    offset: int
    end: SpoolPosition
    spooled_at_ms: int | None
    acked: bool


@dataclass(slots=True)
class _Append:
    frame: bytes
    spooled_at_ms: int
    done: asyncio.Future[None] = field(repr=False)


class Spool:
    """A durable, crash-safe FIFO of :class:`SpoolRecord` on local disk.

    ``directory`` is created when missing and holds nothing but the spool. ``max_bytes``
    (default 1 GiB) bounds the segment files: an append that would pass it raises
    :class:`SpoolFull`. ``segment_bytes`` (default 16 MiB) is where a segment file rolls over;
    a single larger record gets a segment of its own. ``fsync`` (default ``True``) may only be
    turned off where losing the spool on power loss is acceptable (tests, benchmarks).

    All methods are called from one event loop; blocking file I/O runs in worker threads of
    the spool's own. A segment that stays unreadable (an I/O error on every read) for
    ``unreadable_set_aside_s`` (default 300) is moved into ``corrupt/`` whole, so the records
    behind it are drained.
    Use ``async with Spool(...) as spool:`` or :meth:`open` / :meth:`close`. Only one process
    can open a directory at a time (an ``flock`` on ``<directory>/lock``).
    """

    def __init__(
        self,
        *,
        directory: Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = True,
        unreadable_set_aside_s: float = DEFAULT_UNREADABLE_SET_ASIDE_S,
    ) -> None:
        if not unreadable_set_aside_s >= 0:
            raise ValueError(f"unreadable_set_aside_s must be >= 0, got {unreadable_set_aside_s!r}")
        for name, value in (("max_bytes", max_bytes), ("segment_bytes", segment_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if segment_bytes > max_bytes:
            raise ValueError(
                f"segment_bytes ({segment_bytes}) must not exceed max_bytes ({max_bytes})"
            )
        self._directory = Path(directory)
        self._max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._unreadable_set_aside_s = unreadable_set_aside_s
        #: Segments the cursor could not read: id -> (first failure, monotonic s; tries).
        self._unreadable: dict[int, tuple[float, int]] = {}
        # The spool's own worker threads: a disk write must not queue behind other blocking
        # work of the process (a Kafka metadata request waiting out its timeout, say).
        self._executor = _io_executor()
        self._corrupt_dir = self._directory / _CORRUPT_DIR
        self._writer = _SegmentWriter(directory=self._directory, fsync=fsync)
        self._segments: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._next_segment_id = 1
        self._queue: list[_Append] = []
        self._queued_bytes = 0
        self._flusher: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()
        self._committed = SpoolPosition(0, 0)
        self._checkpointed = self._committed
        self._read_pos = self._committed
        self._in_flight: deque[_InFlight] = deque()
        self._by_position: dict[tuple[int, int], _InFlight] = {}
        #: Records acknowledged past the committed position when the cursor was rewound: read
        #: again, they are acknowledged at once rather than returned to be sent again.
        self._acked_ahead: set[tuple[int, int]] = set()
        self._records = 0
        self._bytes = 0
        self._corrupt_records = 0
        self._corrupt_bytes = 0
        self._lock_fd: int | None = None
        self._open = False
        self._closed = False

    @property
    def directory(self) -> Path:
        return self._directory

    def _io(self, func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Awaitable[_T]:
        """Run blocking file I/O on the spool's worker threads."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, partial(func, *args, **kwargs))

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Take the directory, recover it (torn tail, damage, checkpoint) and start serving.

        Raises :class:`SpoolUnavailable` when the directory cannot be created or read, or is
        in use by another process. Damaged content never raises.
        """
        if self._open:
            return
        if self._closed:
            raise RuntimeError("a closed Spool cannot be reopened; create a new one")
        try:
            self._lock_fd, recovered = await self._io(self._open_blocking)
        except OSError as exc:
            # Its worker would idle until exit; a new executor starts no thread until used.
            self._executor.shutdown(wait=False)
            self._executor = _io_executor()
            raise SpoolUnavailable(
                f"cannot open spool {self._directory}: {exc.strerror or exc}"
            ) from exc
        for segment in recovered.segments:
            self._segments[segment.id] = segment
            self._bytes += segment.size_bytes
            self._records += segment.records
        self._next_segment_id = recovered.next_segment_id
        self._committed = self._checkpointed = self._read_pos = recovered.committed
        for incident in recovered.incidents:
            self._note_incident(incident)
        self._open = True
        log.info(
            "spool opened",
            extra={
                "directory": str(self._directory),
                "records": self._records,
                "size_bytes": self._bytes,
                "segments": len(self._segments),
            },
        )

    def _open_blocking(self) -> tuple[int, _Recovered]:
        if not self._directory.is_dir():
            self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self._fsync:
                # Segments fsync their own entries; the new directory's entry needs this.
                _fsync_dir(self._directory.parent)
        if self._corrupt_dir.exists() and not self._corrupt_dir.is_dir():
            # Damage could not be set aside: it would be skipped without a copy or a count.
            raise OSError(errno.ENOTDIR, f"{self._corrupt_dir} is not a directory")
        lock_fd = os.open(
            self._directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise OSError(errno.EBUSY, "spool directory is in use by another process") from None
        try:
            recovered = _recover(self._directory, read_only=False, fsync=self._fsync)
        except BaseException:
            os.close(lock_fd)
            raise
        return lock_fd, recovered

    async def close(self) -> None:
        """Finish the appends already queued, save the checkpoint, release the directory."""
        if not self._open:
            return
        self._open = False  # appends from now on fail fast
        self._closed = True
        flusher = self._flusher
        if flusher is not None:
            with contextlib.suppress(Exception):
                await flusher
        async with self._read_lock:
            await self._save_checkpoint()
        async with self._write_lock:
            await self._seal_active()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> Spool:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- appending ---------------------------------------------------------------------------

    async def append(self, record: SpoolRecord) -> None:
        """Keep ``record``; return once it is written and fsynced.

        Concurrent appends share one write and one fsync (group commit). Raises
        :class:`SpoolFull` past ``max_bytes`` and :class:`SpoolUnavailable` when the disk
        fails (the spool stays usable for later appends) or the spool is closed. A cancelled
        append may still have been kept: a duplicate the drainer resends, never a loss.
        """
        if not self._open:
            raise SpoolUnavailable("spool is not open")
        frame = encode_frame(record)
        used = self._bytes + self._queued_bytes
        if used + len(frame) > self._max_bytes:
            raise SpoolFull(
                f"spool is full: {used} of {self._max_bytes} bytes used, record needs {len(frame)}"
            )
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Append(frame, record.spooled_at_ms, done))
        self._queued_bytes += len(frame)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="spool-flush")
        await done

    async def _flush(self) -> None:
        """Write queued appends batch by batch until the queue is empty.

        While one batch is in the worker thread, new appends queue up and form the next
        batch: the busier the spool, the more records share each fsync.
        """
        batch: list[_Append] = []
        try:
            while self._queue:
                async with self._write_lock:
                    batch, new_segment_id = self._take_batch()
                    outcome = await self._io(
                        self._writer.write, [item.frame for item in batch], new_segment_id
                    )
                    self._apply(batch, outcome)
                batch = []
        except asyncio.CancelledError:
            self._fail_all(batch, "spool writer cancelled")
            raise
        except Exception:
            # A bug, not the disk (the writer reports disk errors in its outcome); no waiter
            # may hang on it.
            log.exception("spool writer failed")
            self._fail_all(batch, "spool writer failed")
        finally:
            self._flusher = None

    def _fail_all(self, batch: list[_Append], message: str) -> None:
        waiting = [*batch, *self._queue]
        self._queue.clear()
        self._queued_bytes -= sum(len(item.frame) for item in waiting)
        for item in waiting:
            if not item.done.done():
                item.done.set_exception(SpoolUnavailable(message))

    def _take_batch(self) -> tuple[list[_Append], int | None]:
        """The next batch, cut so that it fits in one segment (a new one when needed)."""
        active = self._active
        first = len(self._queue[0].frame)
        new_segment = active is None or (
            active.size_bytes > 0 and active.size_bytes + first > self._segment_bytes
        )
        room = self._segment_bytes - (0 if new_segment or active is None else active.size_bytes)
        taken = total = 0
        for item in self._queue:
            size = len(item.frame)
            if taken and (total + size > room or total + size > _MAX_BATCH_BYTES):
                break
            taken += 1
            total += size
        batch = self._queue[:taken]
        del self._queue[:taken]
        new_segment_id = None
        if new_segment:
            # Ids are never reused, not even after a failed creation.
            new_segment_id = self._next_segment_id
            self._next_segment_id += 1
        return batch, new_segment_id

    def _apply(self, batch: list[_Append], outcome: _WriteOutcome) -> None:
        """Mirror what the writer did into the counters, then settle the waiters."""
        self._queued_bytes -= sum(len(item.frame) for item in batch)
        if outcome.sealed_id is not None:
            sealed = self._segments.get(outcome.sealed_id)
            if sealed is not None:
                sealed.sealed = True
            self._active = None
        if outcome.created and outcome.segment_id is not None and not outcome.removed:
            self._active = _Segment(outcome.segment_id, 0, sealed=False)
            self._segments[outcome.segment_id] = self._active
        segment = None if outcome.segment_id is None else self._segments.get(outcome.segment_id)
        if outcome.error is None and segment is not None:
            self._bytes += outcome.size_bytes - segment.size_bytes
            segment.size_bytes = outcome.size_bytes
            if segment.records == 0:
                segment.head_spooled_at_ms = batch[0].spooled_at_ms
            segment.records += len(batch)
            self._records += len(batch)
            for item in batch:
                if not item.done.done():
                    item.done.set_result(None)
            return
        # The segment is no longer known when the reader found its file gone meanwhile.
        error = outcome.error or OSError(errno.ENOENT, "segment file vanished")
        if segment is not None:
            # The writer closed the segment: it is sealed at whatever size it was left with.
            segment.sealed = True
            if outcome.size_bytes >= 0:
                self._bytes += outcome.size_bytes - segment.size_bytes
                segment.size_bytes = outcome.size_bytes
        self._active = None
        if isinstance(error, OSError):
            detail = error.strerror or str(error)
            log.warning(
                "spool write failed",
                extra={
                    "records": len(batch),
                    "segment_id": outcome.segment_id,
                    "error": f"{type(error).__name__}: {detail}",
                },
            )
        else:
            detail = type(error).__name__
            log.error("spool writer failed", exc_info=error, extra={"records": len(batch)})
        failure = SpoolUnavailable(f"spool write failed: {detail}")
        for item in batch:
            if not item.done.done():
                item.done.set_exception(failure)

    # -- reading -----------------------------------------------------------------------------

    async def read_batch(self, max_records: int = 500) -> list[SpooledEntry]:
        """Up to ``max_records`` records after the read cursor, oldest first; ``[]`` if none.

        The cursor moves past what is returned; records appended meanwhile are seen by later
        calls. Damaged bytes met on the way are set aside and skipped. Raises
        :class:`SpoolUnavailable` when a segment cannot be read (try again later).
        """
        if isinstance(max_records, bool) or max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records!r}")
        self._require_open()
        async with self._read_lock:
            entries: list[SpooledEntry] = []
            while len(entries) < max_records:
                if entries and len(self._in_flight) >= _READ_AHEAD_FACTOR * max_records:
                    # Mostly records delivered past one that keeps failing: read no further
                    # ahead of the committed position, or each retry would read (and hold)
                    # more of the spool.
                    break
                segment = self._segment_at_or_after(self._read_pos.segment_id)
                if segment is None:
                    break
                if segment.id != self._read_pos.segment_id:
                    self._read_pos = SpoolPosition(segment.id, 0)
                sealed = segment.sealed
                if not sealed and self._read_pos.offset >= segment.size_bytes:
                    break  # caught up with the appends
                try:
                    outcome = await self._io(
                        _read_segment,
                        self._directory / _segment_name(segment.id),
                        segment.id,
                        offset=self._read_pos.offset,
                        limit=None if sealed else segment.size_bytes,
                        max_records=max_records - len(entries),
                        corrupt_dir=self._corrupt_dir,
                        fsync=self._fsync,
                    )
                except OSError as exc:
                    if await self._unreadable_segment(segment, exc):
                        continue  # moved aside: on to the next segment
                    raise SpoolUnavailable(
                        f"cannot read spool segment {segment.id}: {exc.strerror or exc}"
                    ) from exc
                if self._unreadable.pop(segment.id, None) is not None or segment.unread:
                    segment.unread = False
                    log.info("spool segment readable again", extra={"segment_id": segment.id})
                if outcome.missing:
                    log.warning(
                        "spool segment vanished before it was drained",
                        extra={"segment_id": segment.id, "records": segment.records},
                    )
                self._take_read(segment.id, outcome, entries)
                if outcome.reached_end and (sealed or outcome.missing):
                    self._push(_Kind.END, segment.id, -1, SpoolPosition(segment.id + 1, 0), None)
                    self._read_pos = SpoolPosition(segment.id + 1, 0)
            await self._settle()
            return entries

    async def _unreadable_segment(self, segment: _Segment, exc: OSError) -> bool:
        """Note a failed read of ``segment``; True once it was moved into ``corrupt/``.

        That happens when it stayed unreadable for ``unreadable_set_aside_s`` and at least
        :data:`_UNREADABLE_MIN_TRIES` tries: its bytes are kept whole for a human (a
        ``wifi-bridge spool drain`` of a directory holding it delivers what it can), and the
        records behind it are no longer held up. The active segment is sealed first, so that
        no record is appended to a file that is moved away.
        """
        now = time.monotonic()
        first_s, tries = self._unreadable.get(segment.id, (now, 0))
        if exc.errno not in _NOT_THE_FILE:
            tries += 1
        self._unreadable[segment.id] = (first_s, tries)
        if tries < _UNREADABLE_MIN_TRIES or now - first_s < self._unreadable_set_aside_s:
            return False
        if not segment.sealed:
            async with self._write_lock:
                if self._active is segment:
                    await self._seal_active()
            return False  # moved at the next try, with nothing appended meanwhile
        offset = self._read_pos.offset
        error = f"{type(exc).__name__}: {exc.strerror or exc}"
        try:
            saved_as = await self._io(
                _move_aside, self._directory, segment.id, offset, fsync=self._fsync
            )
        except OSError as move_exc:
            log.error(
                "could not move an unreadable spool segment aside",
                extra={
                    "segment_id": segment.id,
                    "error": f"{type(move_exc).__name__}: {move_exc.strerror}",
                },
            )
            return False
        del self._unreadable[segment.id]
        log.error(
            "spool segment unreadable for too long: moved aside whole, draining on",
            extra={
                "segment_id": segment.id,
                "unreadable_s": round(now - first_s),
                "tries": tries,
                "error": error,
                "saved_as": str(saved_as),
            },
        )
        end = max(segment.size_bytes, offset)
        self._note_incident(
            _Incident(segment.id, offset, end, "unreadable", saved_as, new=True, error=error)
        )
        self._push(_Kind.END, segment.id, -1, SpoolPosition(segment.id + 1, 0), None)
        self._read_pos = SpoolPosition(segment.id + 1, 0)
        return True

    def _take_read(self, segment_id: int, outcome: _ReadOutcome, into: list[SpooledEntry]) -> None:
        acked_ahead = self._acked_ahead
        for entry, incident in outcome.items:
            if entry is not None:
                end = SpoolPosition(segment_id, entry.end_offset)
                ts = entry.record.spooled_at_ms
                self._push(_Kind.RECORD, segment_id, entry.offset, end, ts)
                if acked_ahead and (segment_id, entry.offset) in acked_ahead:
                    acked_ahead.discard((segment_id, entry.offset))
                    self._by_position[(segment_id, entry.offset)].acked = True
                    continue
                into.append(entry)
            elif incident is not None:
                self._note_incident(incident)
                end = SpoolPosition(segment_id, incident.end)
                self._push(_Kind.GAP, segment_id, incident.start, end, None)
        self._read_pos = SpoolPosition(segment_id, outcome.next_offset)

    def _push(
        self, kind: _Kind, segment_id: int, offset: int, end: SpoolPosition, ts: int | None
    ) -> None:
        # Gaps and segment ends have nothing to deliver: they count as acknowledged at once.
        item = _InFlight(kind, segment_id, offset, end, ts, acked=kind is not _Kind.RECORD)
        self._in_flight.append(item)
        if kind is _Kind.RECORD:
            self._by_position[(segment_id, offset)] = item

    async def iter_batches(self, *, max_records: int = 500) -> AsyncIterator[list[SpooledEntry]]:
        """Batches from the read cursor until the spool has nothing more to read.

        For an offline drain (``wifi-bridge spool drain DIR``): publish each batch, then
        :meth:`acknowledge` it; whatever is not acknowledged stays for the next run.
        """
        while True:
            batch = await self.read_batch(max_records)
            if not batch:
                return
            yield batch

    async def acknowledge(self, entries: Iterable[SpooledEntry]) -> None:
        """Mark ``entries`` delivered.

        The committed position advances over the longest delivered prefix in read order, so
        acknowledging out of order never skips a record. Segments wholly behind it are
        deleted, and the position is checkpointed (best effort: a failure is logged and only
        means some records are sent again after a restart). Unknown entries are ignored.
        """
        self._require_open()
        async with self._read_lock:
            for entry in entries:
                item = self._by_position.get((entry.segment_id, entry.offset))
                if item is not None:
                    item.acked = True
            await self._settle()

    async def set_aside(self, entry: SpooledEntry, *, reason: str) -> Path | None:
        """Take a record Kafka refuses for good out of the drain, and acknowledge it.

        Its frame is copied whole into ``corrupt/`` (named like damage, with ``reason``), where
        :func:`decode_frame` reads it back. Returns that file, or ``None`` when the copy failed
        (logged): the record is acknowledged either way, so a refused record never stops the
        drain.
        """
        self._require_open()
        gap = Gap(entry.offset, entry.end_offset, reason)
        path = self._directory / _segment_name(entry.segment_id)
        incident = await self._io(
            _set_aside_record, path, entry.segment_id, gap, self._corrupt_dir, fsync=self._fsync
        )
        if incident.saved_as is None:
            log.warning(
                "could not copy a refused spool record aside; it is dropped",
                extra={
                    "segment_id": entry.segment_id,
                    "offset": entry.offset,
                    "reason": reason,
                    "error": incident.error,
                },
            )
        await self.acknowledge([entry])
        return incident.saved_as

    async def rewind(self) -> None:
        """Move the read cursor back to the committed position (after a failed publish).

        Records acknowledged beyond that position (delivered while an earlier one failed) are
        not returned again by the reads that follow in this process: they are in Kafka.
        """
        self._require_open()
        async with self._read_lock:
            self._acked_ahead.update(
                (item.segment_id, item.offset)
                for item in self._in_flight
                if item.acked and item.kind is _Kind.RECORD
            )
            self._in_flight.clear()
            self._by_position.clear()
            self._read_pos = self._committed

    @property
    def committed(self) -> SpoolPosition:
        """Everything before this position has been delivered."""
        return self._committed

    async def _settle(self) -> None:
        """Advance the committed position, checkpoint it, and drop fully delivered segments."""
        finished: list[int] = []
        while self._in_flight and self._in_flight[0].acked:
            item = self._in_flight.popleft()
            if item.kind is _Kind.RECORD:
                del self._by_position[(item.segment_id, item.offset)]
                segment = self._segments.get(item.segment_id)
                if segment is not None and segment.records > 0:
                    segment.records -= 1
                    self._records -= 1
                    segment.head_spooled_at_ms = item.spooled_at_ms if segment.records else None
            elif item.kind is _Kind.END:
                finished.append(item.segment_id)
            self._committed = item.end
        drained = await self._retire_drained_active()
        if drained is not None:
            finished.append(drained)
        # Checkpoint first: a crash between the two steps resends, it never skips.
        await self._save_checkpoint()
        if finished:
            await self._delete_segments(finished)

    async def _retire_drained_active(self) -> int | None:
        """Close the active segment once everything in it is delivered, so it can be deleted."""
        segment = self._active
        if segment is None or self._in_flight:
            return None
        if self._committed != SpoolPosition(segment.id, segment.size_bytes):
            return None
        async with self._write_lock:
            # An append may have landed while we waited for the lock.
            if self._active is not segment or self._committed != SpoolPosition(
                segment.id, segment.size_bytes
            ):
                return None
            await self._seal_active()
        return segment.id

    async def _seal_active(self) -> None:
        """Close the segment being appended to (the write lock held): the next append starts
        a new one."""
        await self._io(self._writer.close)
        if self._active is not None:
            self._active.sealed = True
            self._active = None

    async def _save_checkpoint(self) -> None:
        position = self._committed
        if position == self._checkpointed:
            return
        try:
            await self._io(_write_checkpoint, self._directory, position, fsync=self._fsync)
        except OSError as exc:
            log.warning(
                "could not save the spool checkpoint; a restart will resend some records",
                extra={"error": f"{type(exc).__name__}: {exc.strerror}"},
            )
            return
        self._checkpointed = position

    async def _delete_segments(self, segment_ids: list[int]) -> None:
        paths = []
        for segment_id in segment_ids:
            segment = self._segments.pop(segment_id, None)
            if segment is None:
                continue
            self._bytes -= segment.size_bytes
            self._records -= segment.records  # only non-zero if damage hid counted records
            paths.append(self._directory / _segment_name(segment_id))
        for path in paths:
            await self._io(_remove, path)

    def _segment_at_or_after(self, segment_id: int) -> _Segment | None:
        # The dict is in id order: segments are added at open in order, then with rising ids.
        return next((s for s in self._segments.values() if s.id >= segment_id), None)

    # -- state -------------------------------------------------------------------------------

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def stats(self) -> SpoolStats:
        """Counters of the spool (see :class:`SpoolStats`); no disk access."""
        return SpoolStats(
            records=max(self._records, 0),
            bytes=self._bytes,
            segments=len(self._segments),
            oldest_spooled_at_ms=self._oldest_spooled_at_ms(),
            corrupt_records=self._corrupt_records,
            corrupt_bytes=self._corrupt_bytes,
            unreadable_segments=sum(
                1 for s in self._segments.values() if s.unread or s.id in self._unreadable
            ),
        )

    def _oldest_spooled_at_ms(self) -> int | None:
        if self._records <= 0:
            return None
        if self._in_flight and self._in_flight[0].kind is _Kind.RECORD:
            return self._in_flight[0].spooled_at_ms
        return next((s.head_spooled_at_ms for s in self._segments.values() if s.records > 0), None)

    def _note_incident(self, incident: _Incident) -> None:
        extra = {
            "segment_id": incident.segment_id,
            "offset": incident.start,
            "length_bytes": incident.end - incident.start,
            "reason": incident.reason,
            "saved_as": str(incident.saved_as) if incident.saved_as else None,
        }
        if not incident.new:
            log.debug("known damaged spool bytes skipped", extra=extra)
            return
        self._corrupt_records += 1
        self._corrupt_bytes += incident.end - incident.start
        if incident.error:
            extra["error"] = incident.error
        log.warning("damaged spool bytes set aside", extra=extra)

    def _require_open(self) -> None:
        if not self._open:
            raise SpoolUnavailable("spool is not open")


def _io_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="spool-io")


def read_stats(directory: Path) -> SpoolStats:
    """Stats of a spool directory without changing it (``wifi-bridge spool status DIR``).

    Blocking; safe while a bridge has the spool open (it takes no lock and writes nothing).
    Damage is counted in ``corrupt_records`` / ``corrupt_bytes`` but not set aside.
    Raises :class:`SpoolUnavailable` when the directory cannot be read.
    """
    try:
        recovered = _recover(Path(directory), read_only=True, fsync=False)
    except OSError as exc:
        raise SpoolUnavailable(f"cannot read spool {directory}: {exc.strerror or exc}") from exc
    records = sum(s.records for s in recovered.segments)
    oldest = next(
        (s.head_spooled_at_ms for s in recovered.segments if s.records > 0),
        None,
    )
    return SpoolStats(
        records=records,
        bytes=sum(s.size_bytes for s in recovered.segments),
        segments=len(recovered.segments),
        oldest_spooled_at_ms=oldest,
        corrupt_records=len(recovered.incidents),
        corrupt_bytes=sum(i.end - i.start for i in recovered.incidents),
        unreadable_segments=sum(1 for s in recovered.segments if s.unread),
    )
