"""The CRM adapters' pure parts and the sink's SQLite file, without Kafka or a server."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import orjson
import pytest

from consumers.sinks.contacts import Contact, SyncMark, UnreadableRecord, login_from_record
from consumers.sinks.crm_port import (
    MAX_DETAIL_BYTES,
    TRUNCATED_MARKER,
    CrmUnavailable,
    truncate_detail,
)
from consumers.sinks.crm_retry import RetryReason
from consumers.sinks.hubspot import contact_properties, read_answer, upsert_body
from consumers.sinks.outbox import CrmStateError, CrmStore
from consumers.sinks.webhook import sign, verify
from tests.fixtures.canonical import canonical_login


def contact(n: int, **changes: object) -> Contact:
    fields: dict[str, object] = {
        "email": f"c{n}@example.com",
        "first_name": "Ann",
        "last_name": None,
        "provider": "Form",
        "last_venue_id": "7",
        "last_venue_name": "Cafe",
        "last_visit_ms": 1_700_000_000_123,
        "visit_count": 4,
        "event_id": f"e{n}",
    }
    fields.update(changes)
    return Contact(**fields)  # type: ignore[arg-type]


def test_hubspot_inputs_are_keyed_by_email_traced_by_index_and_leave_unknowns_out() -> None:
    body = orjson.loads(upsert_body([contact(0), contact(1)]))
    first = body["inputs"][0]
    assert (first["idProperty"], first["id"], first["objectWriteTraceId"]) == (
        "email",
        "c0@example.com",
        "0",
    )
    assert body["inputs"][1]["objectWriteTraceId"] == "1"
    assert first["properties"] == {
        "email": "c0@example.com",
        "firstname": "Ann",
        "wifi_login_provider": "Form",
        "wifi_last_venue_id": "7",
        "wifi_last_venue_name": "Cafe",
        "wifi_last_visit_at": "1700000000123",
        "wifi_visit_count": "4",
    }
    assert "lastname" not in contact_properties(contact(0))


def test_hubspot_200_accepts_every_contact() -> None:
    contacts = [contact(0), contact(1)]
    result = read_answer(200, '{"status":"COMPLETE","results":[]}', contacts)
    assert (result.accepted, result.rejected, result.retry) == (contacts, [], [])


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, "<html><body>Sign in to continue</body></html>"),
        (200, ""),
        (200, '["not", "an", "object"]'),
        (204, ""),
        (202, '{"status":"PENDING"}'),
    ],
)
def test_a_hubspot_2xx_that_is_not_hubspots_answer_is_retried_never_accepted(
    status: int, body: str
) -> None:
    # A proxy's sign-in page or a web server at a wrong base URL: nobody stored the contacts.
    with pytest.raises(CrmUnavailable) as raised:
        read_answer(status, body, [contact(0)])
    assert raised.value.reason is RetryReason.UNEXPECTED_ANSWER
    assert raised.value.status == status


def test_hubspot_207_sorts_each_contact_by_its_error() -> None:
    contacts = [contact(n) for n in range(4)]
    answer = {
        "status": "COMPLETE",
        "results": [{"id": "1", "objectWriteTraceId": "0", "properties": {}}],
        "numErrors": 2,
        "errors": [
            {
                "status": "error",
                "category": "VALIDATION_ERROR",
                "message": "Property values were not valid",
                "context": {"objectWriteTraceId": ["1"]},
            },
            {
                "status": "error",
                "category": "RATE_LIMITS",
                "message": "slow down",
                "context": {"objectWriteTraceId": ["2"]},
            },
        ],
    }
    result = read_answer(207, orjson.dumps(answer).decode(), contacts)
    assert result.accepted == [contacts[0]]
    assert [r.contact for r in result.rejected] == [contacts[1]]
    assert result.rejected[0].status == 207
    assert "Property values were not valid" in result.rejected[0].detail
    # the rate-limited one, and the one the answer never mentions, are tried again
    assert result.retry == [contacts[2], contacts[3]]


def test_hubspot_207_error_naming_inputs_by_email_and_an_unreadable_207() -> None:
    contacts = [contact(0), contact(1)]
    answer = {
        "results": [{"id": "9", "properties": {"email": "C0@example.com"}}],
        "errors": [{"category": "VALIDATION_ERROR", "context": {"ids": ["c1@example.com"]}}],
    }
    result = read_answer(207, orjson.dumps(answer).decode(), contacts)
    assert result.accepted == [contacts[0]]
    assert [r.contact for r in result.rejected] == [contacts[1]]
    garbled = read_answer(207, "<html>oops</html>", contacts)
    assert garbled.retry == contacts


def test_crm_detail_is_cut_to_its_byte_limit_on_a_character_boundary_and_marked() -> None:
    cut = truncate_detail("é" * MAX_DETAIL_BYTES)
    assert len(cut.encode()) <= MAX_DETAIL_BYTES
    assert cut.endswith(TRUNCATED_MARKER)
    assert set(cut.removesuffix(TRUNCATED_MARKER)) == {"é"}
    whole = "é" * (MAX_DETAIL_BYTES // 2)
    assert truncate_detail(whole) == whole


def test_webhook_signature_verifies_and_refuses_tampering_other_keys_and_old_requests() -> None:
    secret, body = b"0123456789abcdef-secret", b'{"contacts":[]}'
    signature = sign(secret, 1_800_000_000, body)
    assert signature.startswith("v1=")
    now = 1_800_000_010

    def check(
        *, key: bytes = secret, stamp: str = "1800000000", data: bytes = body, at: int = now
    ) -> bool:
        return verify(key, timestamp=stamp, signature=signature, body=data, now_s=at)

    assert check()
    assert not check(data=body + b" ")
    assert not check(key=b"another-secret-0123")
    assert not check(stamp="1800000001")
    assert not check(at=1_800_000_000 + 301)
    assert not verify(secret, timestamp=None, signature=signature, body=body, now_s=0)


def test_store_keeps_marks_across_reopening_and_never_moves_them_backwards(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "crm.db"
    store = CrmStore(path)
    store.save_marks([SyncMark("u1", 100, 100), SyncMark("u2", None, 50)])
    store.save_marks([SyncMark("u1", 10, 10), SyncMark("u2", None, 60)])
    store.close()
    reopened = CrmStore(path)
    assert reopened.marks(["u1", "u2", "u3"]) == {
        "u1": SyncMark("u1", 100, 100),
        "u2": SyncMark("u2", None, 60),
    }
    reopened.save_marks([SyncMark("u2", 70, 70)])
    assert reopened.marks(["u2"]) == {"u2": SyncMark("u2", 70, 70)}
    reopened.close()


def test_outbox_stores_an_upsert_once_however_often_it_is_written(tmp_path: Path) -> None:
    store = CrmStore(tmp_path / "crm.db")
    store.store_outbox([contact(0), contact(1)])
    store.store_outbox([contact(0), contact(1), contact(2)])
    assert store.outbox_rows() == 3
    store.close()


def test_marks_of_many_users_are_read_in_one_query(tmp_path: Path) -> None:
    store = CrmStore(tmp_path / "crm.db")
    store.save_marks([SyncMark(f"u{n}", n, n) for n in range(2000)])
    assert len(store.marks(f"u{n}" for n in range(0, 4000, 2))) == 1000
    store.close()


def test_a_state_file_locked_by_another_connection_raises_a_retryable_error_until_freed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "crm.db"
    store = CrmStore(path, busy_timeout_ms=50)
    store.save_marks([SyncMark("u1", 1, 1)])
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(CrmStateError) as saving:
            store.save_marks([SyncMark("u2", 2, 2)])
        assert (saving.value.operation, saving.value.error) == ("save_marks", "SQLITE_BUSY")
        assert saving.value.retryable
        with pytest.raises(CrmStateError) as writing:
            store.store_outbox([contact(0)])
        assert writing.value.operation == "write_outbox"
        # WAL: reading goes on while another connection writes
        assert store.marks(["u1"]) == {"u1": SyncMark("u1", 1, 1)}
        other.execute("ROLLBACK")
    # nothing of the failed attempts is left half done: the same calls now go through
    store.save_marks([SyncMark("u2", 2, 2)])
    store.store_outbox([contact(0)])
    assert store.marks(["u1", "u2"]) == {"u1": SyncMark("u1", 1, 1), "u2": SyncMark("u2", 2, 2)}
    assert store.outbox_rows() == 1
    store.close()


def test_a_state_file_that_cannot_be_read_raises_a_state_error_naming_the_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "crm.db"
    store = CrmStore(path, busy_timeout_ms=50)
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("DROP TABLE crm_sync_state")
    with pytest.raises(CrmStateError) as reading:
        store.marks(["u1"])
    assert reading.value.operation == "read_marks"
    assert "u1" not in str(reading.value)
    store.close()


@pytest.mark.parametrize("bad", ["", "short"])
def test_webhook_adapter_refuses_a_short_secret_early(bad: str) -> None:
    from consumers.sinks.crm_http import HttpClient
    from consumers.sinks.crm_metrics import CrmMetrics
    from consumers.sinks.ratelimit import SlidingWindowLimiter
    from consumers.sinks.webhook import WebhookCrm

    http = HttpClient(
        crm="webhook",
        limiter=SlidingWindowLimiter(max_requests=1, window_s=1),
        metrics=CrmMetrics(),
        timeout_s=1,
    )
    with pytest.raises(ValueError, match="secret"):
        WebhookCrm(url="http://127.0.0.1:1/", secret=bad, http=http)


def test_the_mark_of_every_user_key_a_login_can_have_is_found_again(tmp_path: Path) -> None:
    # A key the store could not find again would escape the throttle: every login sent again.
    store = CrmStore(tmp_path / "state.db")
    for user_id in ("café", "x" * 5000, "a\x00b", "  spaced  ", "mac:02:00:00:00:00:01"):
        record = canonical_login(email="ann@example.com")
        record["user"]["id"] = user_id
        try:
            key = login_from_record(record).user_key
        except UnreadableRecord:
            continue  # goes to the dead-letter topic, never marked
        store.save_marks([SyncMark(key, 5, 5)])
        assert store.marks([key]) == {key: SyncMark(key, 5, 5)}, repr(key[:20])
    store.close()
