from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge import spool as spool_module
from bridge.errors import WifiBridgeError
from bridge.spool import (
    FRAME_HEADER_BYTES,
    Frame,
    Gap,
    Spool,
    SpooledEntry,
    SpoolFull,
    SpoolPosition,
    SpoolRecord,
    SpoolStats,
    SpoolUnavailable,
    decode_frame,
    encode_frame,
    read_stats,
    scan_frames,
)


def make_record(i: int, *, size: int = 64, spooled_at_ms: int | None = None) -> SpoolRecord:
    return SpoolRecord(
        topic="wifi.auth.raw",
        key=b"user-%d" % i,
        value=(b'{"n":%d,"pad":"' % i).ljust(size - 2, b"x") + b'"}',
        headers=[("event_id", b"%032x" % i)],
        spooled_at_ms=1_700_000_000_000 + i if spooled_at_ms is None else spooled_at_ms,
    )


FRAME_BYTES = len(encode_frame(make_record(0)))


def values(entries: list[SpooledEntry]) -> list[bytes]:
    return [e.record.value for e in entries]


def segment_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.seg"))


async def read_all(spool: Spool, *, acknowledge: bool = True) -> list[SpooledEntry]:
    entries: list[SpooledEntry] = []
    while batch := await spool.read_batch(100):
        entries += batch
        if acknowledge:
            await spool.acknowledge(batch)
    return entries


async def spool_with(directory: Path, records: list[SpoolRecord], **options: Any) -> None:
    """Fill a spool and close it, so a test can damage the files before reopening."""
    async with Spool(directory=directory, **options) as spool:
        for record in records:
            await spool.append(record)


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def segment_path(directory: Path, segment_id: int) -> str:
    return str(directory.resolve() / f"{segment_id:020d}.seg")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def put_file_in_place_of(directory: Path, *, aside: Path) -> None:
    directory.rename(aside)
    directory.write_text("not a directory")


def put_back(directory: Path, *, aside: Path) -> None:
    directory.unlink()
    aside.rename(directory)


def damage_second_record(directory: Path) -> None:
    """Flip a byte inside the second record of segment 1."""
    segment = directory / "00000000000000000001.seg"
    data = bytearray(segment.read_bytes())
    data[FRAME_BYTES + 30] ^= 0xFF
    segment.write_bytes(bytes(data))


def write_odd_segments(directory: Path) -> None:
    """Empty, random, half-valid, one-byte and not-a-file segments, plus a stray file.

    Valid records 1 to 4 are hidden among them, in that order.
    """
    directory.mkdir()
    rng = random.Random(1)
    (directory / "00000000000000000001.seg").write_bytes(b"")
    (directory / "00000000000000000002.seg").write_bytes(rng.randbytes(20_000))
    mixed = rng.randbytes(500) + encode_frame(make_record(1)) + b"\xf5" * 300
    mixed += encode_frame(make_record(2)) + rng.randbytes(100) + encode_frame(make_record(3))
    (directory / "00000000000000000003.seg").write_bytes(mixed)
    (directory / "00000000000000000004.seg").write_bytes(b"\xf5")
    (directory / "00000000000000000005.seg").write_bytes(encode_frame(make_record(4)))
    (directory / "00000000000000000009.seg").mkdir()  # not even a file
    (directory / "notes.txt").write_text("ignored")


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


# -- the pure codec ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        SpoolRecord(topic="t", key=None, value=b"{}", headers=[], spooled_at_ms=0),
        SpoolRecord(topic="t", key=b"", value=b"", headers=[], spooled_at_ms=-1),
        SpoolRecord(
            topic="wifi.ünïcode",
            key=bytes(range(256)),
            value=bytes(range(256)) * 4 + b"\xf5\xf5\x00",
            headers=[("event_id", b"\x00\xff\xf5"), ("empty", b""), ("event_id", b"dup")],
            spooled_at_ms=2**63 - 1,
        ),
    ],
    ids=["none-key", "empty-key-empty-value", "binary-everything"],
)
def test_frame_round_trip_keeps_every_field(record: SpoolRecord) -> None:
    decoded = decode_frame(encode_frame(record))
    assert decoded == record
    assert decoded.key is None if record.key is None else decoded.key == record.key


def test_every_single_flipped_byte_of_a_frame_is_detected() -> None:
    frame = encode_frame(make_record(7))
    for pos in range(len(frame)):
        damaged = bytearray(frame)
        damaged[pos] ^= 0x01
        with pytest.raises(ValueError, match="not a valid frame"):
            decode_frame(bytes(damaged))


def test_encode_frame_rejects_fields_the_format_cannot_hold() -> None:
    with pytest.raises(ValueError, match="topic"):
        encode_frame(
            SpoolRecord(topic="t" * 70000, key=None, value=b"", headers=[], spooled_at_ms=0)
        )
    with pytest.raises(ValueError, match="64 bits"):
        encode_frame(SpoolRecord(topic="t", key=None, value=b"", headers=[], spooled_at_ms=2**63))


def test_scan_resynchronises_at_the_next_valid_frame_after_damage() -> None:
    frames = [encode_frame(make_record(i)) for i in range(3)]
    damaged = bytearray(b"".join(frames))
    damaged[len(frames[0]) + FRAME_HEADER_BYTES + 5] ^= 0xFF
    items = scan_frames(bytes(damaged), base_offset=100)
    assert [type(i) for i in items] == [Frame, Gap, Frame]
    gap = items[1]
    assert isinstance(gap, Gap)
    assert (gap.start, gap.end, gap.reason) == (
        100 + len(frames[0]),
        100 + len(frames[0]) + len(frames[1]),
        "crc_mismatch",
    )


@pytest.mark.parametrize("seed", range(25))
def test_scan_of_random_garbage_finds_every_embedded_frame_and_covers_every_byte(
    seed: int,
) -> None:
    rng = random.Random(seed)
    data = bytearray()
    embedded: list[SpoolRecord] = []
    for i in range(8):
        # Garbage rich in the magic byte and in plausible lengths, the worst case for resync.
        data += bytes(
            rng.choice([0xF5, 0x00, 0x01, rng.randrange(256)]) for _ in range(rng.randrange(300))
        )
        if rng.random() < 0.7:
            embedded.append(make_record(seed * 100 + i, size=rng.randrange(30, 400)))
            data += encode_frame(embedded[-1])
    items = scan_frames(bytes(data))
    assert [i.record for i in items if isinstance(i, Frame)] == embedded
    assert [(i.start, i.end) for i in items] == list(
        zip([0, *(i.end for i in items[:-1])], [i.end for i in items], strict=True)
    )
    assert (items[-1].end if items else 0) == len(data)


# -- appending and reading ---------------------------------------------------------------------


async def test_records_read_back_identical_and_oldest_first_across_segments(
    spool_dir: Path,
) -> None:
    records = [make_record(i) for i in range(40)]
    records[3] = SpoolRecord(topic="t", key=None, value=b"", headers=[], spooled_at_ms=5)
    records[4] = SpoolRecord(
        topic="t", key=b"", value=b"\xf5\x00\xff", headers=[("h", b"\x00")], spooled_at_ms=6
    )
    async with Spool(directory=spool_dir, segment_bytes=5 * FRAME_BYTES) as spool:
        for record in records:
            await spool.append(record)
        assert len(segment_files(spool_dir)) >= 8
        entries = await read_all(spool)
    assert [e.record for e in entries] == records
    assert entries[3].record.key is None
    assert entries[4].record.key == b""
    positions = [e.position for e in entries]
    assert positions == sorted(positions)


async def test_reader_sees_records_appended_after_it_started(spool_dir: Path) -> None:
    async with Spool(directory=spool_dir) as spool:
        await spool.append(make_record(1))
        assert values(await spool.read_batch(10)) == [make_record(1).value]
        assert await spool.read_batch(10) == []
        await spool.append(make_record(2))
        await spool.append(make_record(3))
        assert values(await spool.read_batch(10)) == [make_record(2).value, make_record(3).value]


async def test_concurrent_appends_share_one_fsync(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        real_fsync(fd)

    async with Spool(directory=spool_dir) as spool:
        monkeypatch.setattr(os, "fsync", counting_fsync)
        await asyncio.gather(*(spool.append(make_record(i)) for i in range(64)))
        monkeypatch.undo()
        assert spool.stats().records == 64
    # One batch: the segment file plus the directory that gained it.
    assert 1 <= calls <= 4


async def test_append_returns_only_after_its_record_is_fsynced(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        time.sleep(0.002)  # a slow disk widens the window a premature return would fall into
        real_fsync(fd)
        synced.append((fd_path(fd), os.fstat(fd).st_size))

    seen_at_return: dict[bytes, list[tuple[str, int]]] = {}

    async with Spool(directory=spool_dir, segment_bytes=10 * FRAME_BYTES) as spool:
        monkeypatch.setattr(os, "fsync", recording_fsync)

        async def append(i: int) -> None:
            await asyncio.sleep(0.001 * (i % 7))
            await spool.append(make_record(i))
            seen_at_return[make_record(i).value] = list(synced)

        await asyncio.gather(*(append(i) for i in range(64)))
        monkeypatch.undo()
        entries = await read_all(spool)
    assert len(entries) == 64
    for entry in entries:
        path = segment_path(spool_dir, entry.segment_id)
        synced_then = seen_at_return[entry.record.value]
        assert any(p == path and size >= entry.end_offset for p, size in synced_then), entry


async def test_reader_never_sees_a_record_before_its_fsync_completes(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_fsync, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def stalled_fsync(fd: int) -> None:
        if fd_path(fd).endswith(".seg"):
            in_fsync.set()
            release.wait(timeout=10)
        real_fsync(fd)

    async with Spool(directory=spool_dir) as spool:
        await spool.append(make_record(0))
        monkeypatch.setattr(os, "fsync", stalled_fsync)
        pending = asyncio.create_task(spool.append(make_record(1)))
        assert await asyncio.to_thread(in_fsync.wait, 10)
        # Record 1 is written but not yet fsynced: neither the appender nor the reader
        # may treat it as safe.
        assert values(await spool.read_batch(10)) == [make_record(0).value]
        assert not pending.done()
        release.set()
        await pending
        assert values(await spool.read_batch(10)) == [make_record(1).value]


async def test_iter_batches_yields_everything_then_stops(spool_dir: Path) -> None:
    await spool_with(spool_dir, [make_record(i) for i in range(25)])
    async with Spool(directory=spool_dir) as spool:
        batches = [batch async for batch in spool.iter_batches(max_records=10)]
        assert [len(b) for b in batches] == [10, 10, 5]
        assert spool.stats().records == 25  # nothing acknowledged yet


async def test_rewind_rereads_unacknowledged_records(spool_dir: Path) -> None:
    async with Spool(directory=spool_dir) as spool:
        for i in range(5):
            await spool.append(make_record(i))
        first = await spool.read_batch(5)
        await spool.acknowledge(first[:2])
        await spool.rewind()
        assert values(await spool.read_batch(10)) == values(first[2:])


async def test_records_acknowledged_past_a_failed_one_are_not_read_again_after_a_rewind(
    spool_dir: Path,
) -> None:
    # A drain batch: record 1 failed, the records after it reached Kafka.
    async with Spool(directory=spool_dir, segment_bytes=200) as spool:  # several segments
        for i in range(6):
            await spool.append(make_record(i))
        first = await spool.read_batch(6)
        await spool.acknowledge([first[0], *first[2:]])
        assert spool.stats().records == 5
        await spool.rewind()
        again = await spool.read_batch(10)
        assert values(again) == [make_record(1).value]
        await spool.acknowledge(again)
        assert spool.stats().records == 0
        assert await spool.read_batch(10) == []
    assert segment_files(spool_dir) == []


async def test_a_record_that_keeps_failing_holds_a_bounded_read_ahead_and_nothing_is_sent_twice(
    spool_dir: Path,
) -> None:
    async with Spool(directory=spool_dir, segment_bytes=400) as spool:
        for i in range(60):
            await spool.append(make_record(i))
        delivered: list[bytes] = []
        for _ in range(15):  # record 0 fails every time; what comes after it is delivered
            batch = await spool.read_batch(5)
            assert values(batch)[0] == make_record(0).value
            await spool.acknowledge(batch[1:])
            delivered += values(batch[1:])
            assert len(spool._in_flight) <= 5 * 5  # not the whole spool, however many tries
            await spool.rewind()
        rest = await read_all(spool)  # record 0 goes through at last
        delivered += values(rest)
        assert sorted(delivered) == sorted(make_record(i).value for i in range(60))
        assert spool.stats().records == 0


async def test_record_larger_than_a_segment_gets_a_segment_of_its_own(spool_dir: Path) -> None:
    big = make_record(1, size=5000)
    async with Spool(directory=spool_dir, segment_bytes=1000) as spool:
        await spool.append(make_record(0))
        await spool.append(big)
        await spool.append(make_record(2))
        assert len(segment_files(spool_dir)) == 3
        assert [e.record for e in await read_all(spool)] == [make_record(0), big, make_record(2)]


# -- acknowledging, deleting, reopening --------------------------------------------------------


async def test_segment_is_deleted_only_once_all_its_records_are_acknowledged(
    spool_dir: Path,
) -> None:
    async with Spool(directory=spool_dir, segment_bytes=3 * FRAME_BYTES) as spool:
        for i in range(9):
            await spool.append(make_record(i))
        first, second = "00000000000000000001.seg", "00000000000000000002.seg"
        assert segment_files(spool_dir)[:2] == [first, second]
        entries = await spool.read_batch(4)  # all of segment 1, the first of segment 2
        await spool.acknowledge([entries[0], entries[1], entries[3]])
        assert first in segment_files(spool_dir)
        assert spool.committed == SpoolPosition(1, entries[1].end_offset)
        await spool.acknowledge([entries[2]])
        assert first not in segment_files(spool_dir)
        assert second in segment_files(spool_dir)  # records 4 and 5 are still pending
        assert spool.stats().records == 5


async def test_out_of_order_acknowledgement_never_commits_past_a_pending_record(
    spool_dir: Path,
) -> None:
    async with Spool(directory=spool_dir) as spool:
        for i in range(4):
            await spool.append(make_record(i))
        entries = await spool.read_batch(4)
        await spool.acknowledge(entries[2:])
        assert spool.committed == SpoolPosition(0, 0)
    async with Spool(directory=spool_dir) as spool:
        assert values(await read_all(spool)) == values(entries)


async def test_fully_drained_active_segment_is_removed_and_appends_continue(
    spool_dir: Path,
) -> None:
    async with Spool(directory=spool_dir) as spool:
        for i in range(3):
            await spool.append(make_record(i))
        await read_all(spool)
        assert segment_files(spool_dir) == []
        assert spool.stats() == SpoolStats(0, 0, 0, None, 0, 0)
        await spool.append(make_record(3))
        assert segment_files(spool_dir) == ["00000000000000000002.seg"]
        assert values(await read_all(spool)) == [make_record(3).value]


async def test_reopen_keeps_pending_records_and_the_committed_position(spool_dir: Path) -> None:
    async with Spool(directory=spool_dir, segment_bytes=4 * FRAME_BYTES) as spool:
        for i in range(10):
            await spool.append(make_record(i))
        entries = await spool.read_batch(6)
        await spool.acknowledge(entries)
        await spool.read_batch(2)  # read, never acknowledged: must come back
    async with Spool(directory=spool_dir) as spool:
        assert spool.stats().records == 4
        assert values(await read_all(spool)) == [make_record(i).value for i in range(6, 10)]


async def test_new_segments_after_a_drained_restart_sort_after_the_checkpoint(
    spool_dir: Path,
) -> None:
    async with Spool(directory=spool_dir) as spool:
        for i in range(3):
            await spool.append(make_record(i))
        await read_all(spool)
    async with Spool(directory=spool_dir) as spool:
        await spool.append(make_record(3))
    async with Spool(directory=spool_dir) as spool:
        assert values(await read_all(spool)) == [make_record(3).value]


async def test_damaged_checkpoint_resends_instead_of_skipping(spool_dir: Path) -> None:
    async with Spool(directory=spool_dir) as spool:
        for i in range(5):
            await spool.append(make_record(i))
        await spool.acknowledge(await spool.read_batch(2))
    (spool_dir / "checkpoint").write_bytes(b"garbage")
    async with Spool(directory=spool_dir) as spool:
        assert values(await read_all(spool)) == [make_record(i).value for i in range(5)]


# -- damage ------------------------------------------------------------------------------------


async def test_truncated_last_record_is_set_aside_and_the_rest_delivered(
    spool_dir: Path,
) -> None:
    await spool_with(spool_dir, [make_record(i) for i in range(5)])
    segment = spool_dir / "00000000000000000001.seg"
    whole = segment.read_bytes()
    segment.write_bytes(whole[:-10])  # the crash hit the middle of the last append
    async with Spool(directory=spool_dir) as spool:
        stats = spool.stats()
        assert (stats.records, stats.corrupt_records) == (4, 1)
        assert stats.corrupt_bytes == FRAME_BYTES - 10
        assert segment.stat().st_size == stats.bytes == 4 * FRAME_BYTES  # cut at a boundary
        await spool.append(make_record(5))
        delivered = values(await read_all(spool))
    assert delivered == [make_record(i).value for i in (0, 1, 2, 3, 5)]
    (aside,) = (spool_dir / "corrupt").iterdir()
    assert aside.read_bytes() == whole[4 * FRAME_BYTES : -10]
    assert "truncated" in aside.name


async def test_flipped_byte_mid_segment_is_set_aside_and_its_neighbours_delivered(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [make_record(i) for i in range(5)]
    records[2] = SpoolRecord(
        topic="t", key=b"k", value=b"SECRET-PERSONAL-DATA", headers=[], spooled_at_ms=1
    )
    await spool_with(spool_dir, records)
    segment = spool_dir / "00000000000000000001.seg"
    data = bytearray(segment.read_bytes())
    frames = scan_frames(bytes(data))
    bad = frames[2]
    data[bad.start + FRAME_HEADER_BYTES + 3] ^= 0x40
    segment.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="bridge.spool"):
        async with Spool(directory=spool_dir) as spool:
            assert values(await read_all(spool)) == values_of(records, skip=2)
            stats = spool.stats()
    assert (stats.corrupt_records, stats.corrupt_bytes) == (1, bad.end - bad.start)
    (aside,) = (spool_dir / "corrupt").iterdir()
    assert aside.read_bytes() == bytes(data[bad.start : bad.end])
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.__dict__["reason"] == "crc_mismatch"
    assert "SECRET" not in repr(warning.__dict__)
    assert "SECRET" not in warning.getMessage()


def values_of(records: list[SpoolRecord], *, skip: int) -> list[bytes]:
    return [r.value for i, r in enumerate(records) if i != skip]


async def test_damage_found_while_reading_a_live_spool_is_skipped_and_counted(
    spool_dir: Path,
) -> None:
    records = [make_record(i) for i in range(5)]
    async with Spool(directory=spool_dir) as spool:
        for record in records:
            await spool.append(record)
        segment = spool_dir / "00000000000000000001.seg"
        with segment.open("r+b") as f:
            f.seek(FRAME_BYTES + 20)
            f.write(b"\x00")
        assert values(await read_all(spool)) == values_of(records, skip=1)
        assert spool.stats().corrupt_records == 1
        assert spool.stats().records == 0


def put_a_file_at_corrupt(spool_dir: Path) -> None:
    spool_dir.mkdir(exist_ok=True)
    (spool_dir / "corrupt").write_text("not a directory")


async def test_a_corrupt_path_that_is_a_file_refuses_to_open_the_spool(spool_dir: Path) -> None:
    put_a_file_at_corrupt(spool_dir)
    with pytest.raises(SpoolUnavailable, match="corrupt is not a directory"):
        await Spool(directory=spool_dir).open()


async def test_damage_that_cannot_be_set_aside_is_still_counted_and_logged(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [make_record(i) for i in range(5)]
    async with Spool(directory=spool_dir) as spool:
        for record in records:
            await spool.append(record)
        put_a_file_at_corrupt(spool_dir)  # while the spool is open
        segment = spool_dir / "00000000000000000001.seg"
        with segment.open("r+b") as f:
            f.seek(FRAME_BYTES + 20)
            f.write(b"\x00")
        with caplog.at_level("WARNING", logger="bridge.spool"):
            assert values(await read_all(spool)) == values_of(records, skip=1)
        assert spool.stats().corrupt_records == 1
        (warning,) = [r for r in caplog.records if "set aside" in r.getMessage()]
        assert warning.saved_as is None  # type: ignore[attr-defined]
        assert "FileExistsError" in warning.error  # type: ignore[attr-defined]


async def test_length_running_past_the_end_mid_segment_resyncs_at_the_next_record(
    spool_dir: Path,
) -> None:
    records = [make_record(i) for i in range(4)]
    await spool_with(spool_dir, records)
    segment = spool_dir / "00000000000000000001.seg"
    data = bytearray(segment.read_bytes())
    data[FRAME_BYTES + 1 : FRAME_BYTES + 5] = (1 << 29).to_bytes(4, "big")
    segment.write_bytes(bytes(data))
    async with Spool(directory=spool_dir) as spool:
        assert values(await read_all(spool)) == values_of(records, skip=1)
    (aside,) = (spool_dir / "corrupt").iterdir()
    assert aside.name.endswith("_bad_length.bin")


def future_version_frame(record: SpoolRecord) -> bytes:
    """A frame a newer bridge might write: intact (CRC matches), but format version 2."""
    payload = bytearray(encode_frame(record)[FRAME_HEADER_BYTES:])
    payload[0] = 2
    header = b"\xf5" + len(payload).to_bytes(4, "big") + zlib.crc32(payload).to_bytes(4, "big")
    return header + bytes(payload)


def write_segment(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def test_frame_of_an_unknown_format_version_is_set_aside_not_misread(
    spool_dir: Path,
) -> None:
    data = encode_frame(make_record(1)) + future_version_frame(make_record(2))
    write_segment(spool_dir / "00000000000000000001.seg", data + encode_frame(make_record(3)))
    async with Spool(directory=spool_dir) as spool:
        stats = spool.stats()
        assert (stats.records, stats.corrupt_records) == (2, 1)
        assert values(await read_all(spool)) == [make_record(1).value, make_record(3).value]
    (aside,) = (spool_dir / "corrupt").iterdir()
    assert aside.name.endswith("_bad_payload.bin")


async def test_damage_is_set_aside_and_counted_once_across_restarts(spool_dir: Path) -> None:
    await spool_with(spool_dir, [make_record(i) for i in range(3)])
    damage_second_record(spool_dir)
    async with Spool(directory=spool_dir) as spool:
        assert spool.stats().corrupt_records == 1
    async with Spool(directory=spool_dir) as spool:
        assert spool.stats().corrupt_records == 0
        assert len(await read_all(spool)) == 2
    assert len(list((spool_dir / "corrupt").iterdir())) == 1


async def test_garbage_empty_and_odd_segment_files_do_not_stop_the_spool(
    spool_dir: Path,
) -> None:
    write_odd_segments(spool_dir)
    async with Spool(directory=spool_dir) as spool:
        await spool.append(make_record(5))
        delivered = values(await read_all(spool))
        assert spool.stats().records == 0
    assert delivered == [make_record(i).value for i in range(1, 6)]
    # Everything drained is gone; the unreadable entry stays for a human to look at.
    assert segment_files(spool_dir) == ["00000000000000000009.seg"]
    assert (spool_dir / "notes.txt").exists()


async def test_offline_stats_count_without_changing_the_directory(spool_dir: Path) -> None:
    records = [make_record(i, spooled_at_ms=1000 + i) for i in range(6)]
    async with Spool(directory=spool_dir) as spool:
        for record in records:
            await spool.append(record)
        await spool.acknowledge(await spool.read_batch(2))
    segment = spool_dir / "00000000000000000001.seg"
    data = bytearray(segment.read_bytes())
    data[3 * FRAME_BYTES + 40] ^= 0x01
    segment.write_bytes(bytes(data))
    before = snapshot(spool_dir)

    stats = read_stats(spool_dir)

    assert stats == SpoolStats(
        records=3,
        bytes=6 * FRAME_BYTES,
        segments=1,
        oldest_spooled_at_ms=1002,
        corrupt_records=1,
        corrupt_bytes=FRAME_BYTES,
    )
    assert snapshot(spool_dir) == before


def test_offline_stats_of_a_missing_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SpoolUnavailable, match="cannot read spool"):
        read_stats(tmp_path / "nope")


# -- limits and disk trouble -------------------------------------------------------------------


async def test_append_past_max_bytes_raises_spool_full_until_drained(spool_dir: Path) -> None:
    limit = 3 * FRAME_BYTES
    async with Spool(directory=spool_dir, max_bytes=limit, segment_bytes=limit) as spool:
        outcomes = await asyncio.gather(
            *(spool.append(make_record(i)) for i in range(10)), return_exceptions=True
        )
        assert outcomes[:3] == [None, None, None]
        assert all(isinstance(o, SpoolFull) for o in outcomes[3:])
        full = outcomes[3]
        assert isinstance(full, SpoolUnavailable)
        assert isinstance(full, WifiBridgeError)
        assert (full.http_status, full.code, full.retryable) == (503, "spool_full", True)
        assert spool.stats().bytes == limit
        await read_all(spool)
        await spool.append(make_record(99))
        assert values(await read_all(spool)) == [make_record(99).value]


def _failing_on_segments(real: Callable[..., Any], error: OSError) -> Callable[..., Any]:
    def fake(fd: int, *args: Any) -> Any:
        if fd_path(fd).endswith(".seg"):
            raise error
        return real(fd, *args)

    return fake


async def test_failed_write_raises_spool_unavailable_and_later_appends_succeed(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def half_write_then_disk_full(fd: int, data: bytes) -> int:
        if fd_path(fd).endswith(".seg"):
            real_write(fd, bytes(data)[:20])  # a torn write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    async with Spool(directory=spool_dir) as spool:
        await spool.append(make_record(0))
        monkeypatch.setattr(os, "write", half_write_then_disk_full)
        with pytest.raises(SpoolUnavailable, match="No space left") as caught:
            await spool.append(make_record(1))
        assert type(caught.value) is SpoolUnavailable
        monkeypatch.undo()
        await spool.append(make_record(2))
        assert spool.stats().records == 2
    async with Spool(directory=spool_dir) as spool:
        assert values(await read_all(spool)) == [make_record(0).value, make_record(2).value]
        assert spool.stats().corrupt_records == 0  # the torn bytes were cut back


async def test_failed_fsync_fails_the_batch_and_later_appends_succeed(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Spool(directory=spool_dir) as spool:
        await spool.append(make_record(0))
        monkeypatch.setattr(
            os, "fsync", _failing_on_segments(os.fsync, OSError(errno.EIO, "I/O error"))
        )
        results = await asyncio.gather(
            *(spool.append(make_record(i)) for i in range(1, 5)), return_exceptions=True
        )
        assert all(isinstance(r, SpoolUnavailable) for r in results)
        monkeypatch.undo()
        await spool.append(make_record(5))
        assert values(await read_all(spool)) == [make_record(0).value, make_record(5).value]


async def test_read_only_directory_raises_spool_unavailable_until_writable_again(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def read_only_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".seg") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    # Running as root ignores permission bits, so the read-only mount is simulated.
    async with Spool(directory=spool_dir) as spool:
        monkeypatch.setattr(os, "open", read_only_open)
        for i in range(3):
            with pytest.raises(SpoolUnavailable, match="Read-only"):
                await spool.append(make_record(i))
        monkeypatch.undo()
        await spool.append(make_record(3))
        assert values(await read_all(spool)) == [make_record(3).value]


async def test_spool_directory_replaced_or_deleted_fails_appends_until_restored(
    spool_dir: Path, tmp_path: Path
) -> None:
    async with Spool(directory=spool_dir) as spool:
        # A file where the directory was: creating a segment fails for real (ENOTDIR).
        put_file_in_place_of(spool_dir, aside=tmp_path / "moved")
        with pytest.raises(SpoolUnavailable):
            await spool.append(make_record(0))
        put_back(spool_dir, aside=tmp_path / "moved")
        await spool.append(make_record(1))

        # Deleted while a segment is open: writing to the unlinked file must not count as safe.
        shutil.rmtree(spool_dir)
        with pytest.raises(SpoolUnavailable, match="deleted"):
            await spool.append(make_record(2))
        with pytest.raises(SpoolUnavailable):
            await spool.append(make_record(3))  # and no directory to start a new segment in
        os.mkdir(spool_dir)
        await spool.append(make_record(4))
        assert values(await read_all(spool)) == [make_record(4).value]


async def test_second_open_of_a_directory_in_use_is_refused(spool_dir: Path) -> None:
    async with Spool(directory=spool_dir):
        with pytest.raises(SpoolUnavailable, match="in use"):
            await Spool(directory=spool_dir).open()


async def test_append_after_close_raises_spool_unavailable(spool_dir: Path) -> None:
    spool = Spool(directory=spool_dir)
    await spool.open()
    await spool.close()
    with pytest.raises(SpoolUnavailable, match="not open"):
        await spool.append(make_record(0))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_bytes": -5}, "max_bytes"),
        ({"max_bytes": True}, "max_bytes"),
        ({"segment_bytes": 0}, "segment_bytes"),
        ({"segment_bytes": 2.5}, "segment_bytes"),
        ({"max_bytes": 100, "segment_bytes": 200}, "must not exceed"),
    ],
)
def test_constructor_rejects_bad_values(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Spool(directory=tmp_path, **options)


async def test_read_batch_rejects_a_non_positive_size(spool_dir: Path) -> None:
    async with Spool(directory=spool_dir) as spool:
        with pytest.raises(ValueError, match="max_records"):
            await spool.read_batch(0)


# -- stats -------------------------------------------------------------------------------------


async def test_stats_count_pending_records_bytes_segments_and_the_oldest(
    spool_dir: Path,
) -> None:
    async with Spool(directory=spool_dir, segment_bytes=2 * FRAME_BYTES) as spool:
        assert spool.stats() == SpoolStats(0, 0, 0, None, 0, 0)
        for i in range(5):
            await spool.append(make_record(i, spooled_at_ms=1000 * (i + 1)))
        assert spool.stats() == SpoolStats(5, 5 * FRAME_BYTES, 3, 1000, 0, 0)
        entries = await spool.read_batch(3)
        await spool.acknowledge(entries[:1])
        assert spool.stats() == SpoolStats(4, 5 * FRAME_BYTES, 3, 2000, 0, 0)
        await spool.acknowledge(entries[1:])  # segment 1 is complete and goes
        stats = spool.stats()
        assert (stats.records, stats.bytes, stats.segments) == (2, 3 * FRAME_BYTES, 2)
        await read_all(spool)
        assert spool.stats() == SpoolStats(0, 0, 0, None, 0, 0)


# -- segments that cannot be read -------------------------------------------------------------


def as_spool_of_its_own(moved: Path, directory: Path) -> Path:
    """A segment moved into corrupt/, copied as the only segment of a new spool directory
    (as an operator drains it with ``wifi-bridge spool drain``)."""
    directory.mkdir()
    shutil.copy(moved, directory / "00000000000000000001.seg")
    return directory


async def read_moved_segment(moved: Path, directory: Path) -> list[SpooledEntry]:
    """What a segment moved into corrupt/ holds."""
    async with Spool(directory=as_spool_of_its_own(moved, directory)) as spool:
        return await read_all(spool)


def _pread_failing_on(segment_id: int, error: int = errno.EIO) -> Callable[..., bytes]:
    """``os.pread`` that fails on one segment file, by default with an I/O error (a bad disk
    block)."""
    real = os.pread
    name = f"{segment_id:020d}.seg"

    def pread(fd: int, *args: Any) -> bytes:
        if fd_path(fd).endswith(name):
            raise OSError(error, os.strerror(error))
        return real(fd, *args)

    return pread


async def test_a_segment_unreadable_at_open_holds_the_drain_back_and_is_never_deleted_unread(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await spool_with(spool_dir, [make_record(i) for i in range(3)])
    monkeypatch.setattr(os, "pread", _pread_failing_on(1))
    async with Spool(directory=spool_dir) as spool:
        assert spool.stats().unreadable_segments == 1
        await spool.append(make_record(10))  # a request spooled meanwhile: segment 2
        with pytest.raises(SpoolUnavailable, match="segment 1"):
            await spool.read_batch()
        assert spool.committed.segment_id <= 1  # nothing behind it went ahead of it
    assert read_stats(spool_dir).unreadable_segments == 1
    monkeypatch.undo()
    async with Spool(directory=spool_dir) as spool:  # the disk is readable again
        assert spool.stats().unreadable_segments == 0
        assert values(await read_all(spool)) == [make_record(i).value for i in (0, 1, 2, 10)]
    assert segment_files(spool_dir) == []


async def test_a_segment_that_stays_unreadable_is_moved_aside_whole_and_the_rest_drained(
    spool_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await spool_with(spool_dir, [make_record(i) for i in range(3)])
    monkeypatch.setattr(os, "pread", _pread_failing_on(1))
    async with Spool(directory=spool_dir, unreadable_set_aside_s=0) as spool:
        await spool.append(make_record(10))
        for _ in range(2):  # a few tries first, however short the wait
            with pytest.raises(SpoolUnavailable):
                await spool.read_batch()
        assert values(await read_all(spool)) == [make_record(10).value]
        stats = spool.stats()
        assert (stats.unreadable_segments, stats.corrupt_records, stats.records) == (0, 1, 0)
    monkeypatch.undo()
    assert segment_files(spool_dir) == []
    (moved,) = (spool_dir / "corrupt").iterdir()
    assert moved.name == "00000000000000000001_000000000000-end_unreadable.seg"
    # Kept whole: a spool of its own gives its records back (wifi-bridge spool drain).
    assert values(await read_moved_segment(moved, tmp_path / "alone")) == [
        make_record(i).value for i in range(3)
    ]


async def test_a_move_aside_whose_directory_flush_fails_is_still_counted_as_moved(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The rename took effect; only the flush of the directories after it failed.
    await spool_with(spool_dir, [make_record(i) for i in range(3)])
    monkeypatch.setattr(os, "pread", _pread_failing_on(1))
    real_fsync_dir = spool_module._fsync_dir
    moved = spool_dir / "corrupt" / "00000000000000000001_000000000000-end_unreadable.seg"

    def fsync_dir(directory: Path) -> None:
        if moved.exists():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync_dir(directory)

    monkeypatch.setattr(spool_module, "_fsync_dir", fsync_dir)
    async with Spool(directory=spool_dir, unreadable_set_aside_s=0) as spool:
        await spool.append(make_record(10))
        for _ in range(2):
            with pytest.raises(SpoolUnavailable):
                await spool.read_batch()
        assert values(await read_all(spool)) == [make_record(10).value]
        stats = spool.stats()
        assert (stats.unreadable_segments, stats.corrupt_records) == (0, 1)
    assert moved.exists()
    assert "vanished" not in caplog.text


async def test_an_unreadable_active_segment_is_sealed_before_it_is_moved_aside(
    spool_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Spool(directory=spool_dir, unreadable_set_aside_s=0) as spool:
        for i in range(3):
            await spool.append(make_record(i))
        monkeypatch.setattr(os, "pread", _pread_failing_on(1))
        for _ in range(3):
            with pytest.raises(SpoolUnavailable):
                await spool.read_batch()
        await spool.append(make_record(10))  # into a new segment, not the one to be moved
        assert values(await read_all(spool)) == [make_record(10).value]
    monkeypatch.undo()
    (moved,) = (spool_dir / "corrupt").iterdir()
    assert values(await read_moved_segment(moved, tmp_path / "alone")) == [
        make_record(i).value for i in range(3)
    ]


async def test_a_copy_aside_cut_short_by_a_crash_is_made_again_whole(spool_dir: Path) -> None:
    await spool_with(spool_dir, [make_record(i) for i in range(3)])
    damage_second_record(spool_dir)
    async with Spool(directory=spool_dir) as spool:
        assert spool.stats().corrupt_records == 1
    (copy,) = (spool_dir / "corrupt").iterdir()
    whole = copy.read_bytes()
    # A crash mid-copy: the bytes so far under a temporary name, no finished copy.
    copy.unlink()
    (spool_dir / "corrupt" / (copy.name + ".partial")).write_bytes(whole[:10])
    async with Spool(directory=spool_dir) as spool:
        assert spool.stats().corrupt_records == 1  # not taken as set aside before
    assert [p.name for p in (spool_dir / "corrupt").iterdir()] == [copy.name]
    assert copy.read_bytes() == whole


async def test_running_out_of_file_descriptors_never_moves_a_segment_aside(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error says nothing about the file: it stays, to be read once descriptors are back."""
    await spool_with(spool_dir, [make_record(i) for i in range(3)])
    monkeypatch.setattr(os, "pread", _pread_failing_on(1, errno.EMFILE))
    async with Spool(directory=spool_dir, unreadable_set_aside_s=0) as spool:
        for _ in range(5):
            with pytest.raises(SpoolUnavailable):
                await spool.read_batch()
        assert spool.stats().unreadable_segments == 1
        monkeypatch.undo()
        assert values(await read_all(spool)) == [make_record(i).value for i in range(3)]
    assert not (spool_dir / "corrupt").exists()
