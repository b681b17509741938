from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

from bridge.errors import WifiBridgeError
from bridge.event import identify
from consumers.pipeline.normalise import SCHEMA_PATH, NormalisationError, Reason, normalise
from tests.fixtures.samples import DOCUMENTED_SAMPLE, SAMPLES, TABLE_VARIANT

SAMPLE_RECORD: dict[str, Any] = {
    "eventId": identify(orjson.loads(DOCUMENTED_SAMPLE)).event_id,
    "authenticationTime": "2018-01-18T13:27:08.000Z",
    "receivedAt": None,
    "user": {
        "id": "888",
        "email": "webhook@test.com",
        "firstName": "Webhook",
        "lastName": "Test",
        "gender": "F",
        "dateOfBirth": "1970-01-01",
        "provider": "Facebook",
    },
    "client": {
        "mac": "00:01:02:03:04:05",
        "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/64.0.3282.85 Safari/537.36",
    },
    "company": {"id": "999", "name": "Your company name"},
    "venue": {
        "id": "888",
        "name": "Your venue name",
        "latitude": 53.4857388,
        "longitude": -2.0999813,
    },
    "visitCounts": {"888": 7},
    "visit": {"id": None, "isNew": None},
    "late": False,
}

MINIMAL_BODY: dict[str, Any] = {
    "session": {"authenticationTime": "2018-01-18T13:27:08+0000"},
    "user": {"id": 888},
}


def sample() -> dict[str, Any]:
    """The sender's documented sample as a dict, to alter one field at a time."""
    body: dict[str, Any] = orjson.loads(DOCUMENTED_SAMPLE)
    return body


def normalised(body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return normalise(orjson.dumps(body), **kwargs)


def reason_of(raw: bytes) -> Reason:
    with pytest.raises(NormalisationError) as caught:
        normalise(raw)
    return caught.value.reason


# --- both layouts, identity ---------------------------------------------------------------


def test_documented_sample_gives_the_canonical_record() -> None:
    assert normalise(DOCUMENTED_SAMPLE) == SAMPLE_RECORD


def test_both_sender_layouts_give_the_same_record() -> None:
    assert normalise(TABLE_VARIANT) == normalise(DOCUMENTED_SAMPLE)


@pytest.mark.parametrize("raw", SAMPLES.values(), ids=SAMPLES.keys())
def test_event_id_equals_the_bridges_event_id_header(raw: bytes) -> None:
    assert normalise(raw)["eventId"] == identify(orjson.loads(raw)).event_id


def test_given_event_id_is_kept_as_it_is() -> None:
    assert normalise(DOCUMENTED_SAMPLE, event_id="from-header")["eventId"] == "from-header"


def test_redelivery_gives_an_identical_record() -> None:
    assert normalise(DOCUMENTED_SAMPLE) == normalise(DOCUMENTED_SAMPLE)


@pytest.mark.parametrize("value", [888, "888", 888.0, " 888 ", "888.0", "888.00"])
def test_ids_as_numbers_or_numeric_strings_become_the_same_text(value: object) -> None:
    body = sample()
    body["user"]["id"] = value
    body["company"]["id"] = value
    body["user"]["venue"]["id"] = value
    record = normalised(body)
    assert (record["user"]["id"], record["company"]["id"], record["venue"]["id"]) == ("888",) * 3


def test_a_numeric_id_too_large_to_read_exactly_is_refused_not_rounded() -> None:
    # Past 64 bits the JSON parser gives a float: 123456789012345678901 and ...902 would both
    # read as 123456789012345683968, two users as one.
    raw = DOCUMENTED_SAMPLE.replace(
        b'"id":888,"lastName"', b'"id":123456789012345678901,"lastName"'
    )
    with pytest.raises(NormalisationError) as refused:
        normalise(raw)
    assert refused.value.reason is Reason.BAD_ID
    # As a string (the field table's layout) it is kept digit for digit.
    body = sample()
    body["user"]["id"] = "123456789012345678901"
    assert normalised(body)["user"]["id"] == "123456789012345678901"


def test_nested_venue_wins_over_a_top_level_one() -> None:
    body = sample()
    body["venue"] = {"id": 1, "name": "elsewhere"}
    assert normalised(body)["venue"]["id"] == "888"


def test_mac_alone_is_enough_to_identify_a_login() -> None:
    body = {"session": MINIMAL_BODY["session"], "client": {"mac": "AA-BB-CC-DD-EE-FF"}}
    record = normalised(body)
    assert record["user"]["id"] is None
    assert record["client"]["mac"] == "aa:bb:cc:dd:ee:ff"
    assert record["eventId"] == identify(body).event_id


# --- coordinates and times ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("latitude", "longitude"),
    [("53.4857388", "-2.0999813"), (53.4857388, -2.0999813), (" 53.4857388", "-2.0999813 ")],
)
def test_coordinates_as_strings_or_numbers_become_floats(
    latitude: object, longitude: object
) -> None:
    body = sample()
    body["user"]["venue"].update(latitude=latitude, longitude=longitude)
    venue = normalised(body)["venue"]
    assert (venue["latitude"], venue["longitude"]) == (53.4857388, -2.0999813)
    assert type(venue["latitude"]) is float


def test_integer_coordinates_become_floats() -> None:
    body = sample()
    body["user"]["venue"].update(latitude=53, longitude=0)
    venue = normalised(body)["venue"]
    assert (venue["latitude"], venue["longitude"]) == (53.0, 0.0)
    assert type(venue["longitude"]) is float


@pytest.mark.parametrize(
    "spelling",
    [
        "2018-01-18T13:27:08+0000",
        "2018-01-18T13:27:08+00:00",
        "2018-01-18T13:27:08Z",
        "2018-01-18T13:27:08.000Z",
        "2018-01-18T14:27:08+01:00",
        "2018-01-18T14:27:08+0100",
        "2018-01-18T08:27:08-0500",
    ],
)
def test_time_spellings_of_one_instant_give_the_same_utc_time(spelling: str) -> None:
    body = sample()
    body["session"]["authenticationTime"] = spelling
    assert normalised(body)["authenticationTime"] == "2018-01-18T13:27:08.000Z"


def test_authentication_time_keeps_milliseconds() -> None:
    body = sample()
    body["session"]["authenticationTime"] = "2018-01-18T13:27:08.1234+00:00"
    assert normalised(body)["authenticationTime"] == "2018-01-18T13:27:08.123Z"


def test_received_at_is_utc_with_milliseconds() -> None:
    record = normalise(DOCUMENTED_SAMPLE, received_at_ms=1_516_282_030_042)
    assert record["receivedAt"] == "2018-01-18T13:27:10.042Z"


# --- optional fields ----------------------------------------------------------------------


def test_missing_optional_fields_are_null() -> None:
    record = normalised(MINIMAL_BODY)
    assert record["user"] == {
        "id": "888",
        "email": None,
        "firstName": None,
        "lastName": None,
        "gender": None,
        "dateOfBirth": None,
        "provider": None,
    }
    assert record["client"] == {"mac": None, "userAgent": None}
    assert record["company"] == {"id": None, "name": None}
    assert record["venue"] == {"id": None, "name": None, "latitude": None, "longitude": None}
    assert record["visitCounts"] is None
    assert record["receivedAt"] is None
    assert (record["visit"], record["late"]) == ({"id": None, "isNew": None}, False)


def test_null_and_empty_values_are_null() -> None:
    body = sample()
    body["user"].update(email="", firstName=None, provider="  ")
    body["user"]["venue"].update(latitude="", longitude=None)
    record = normalised(body)
    assert (record["user"]["email"], record["user"]["firstName"], record["user"]["provider"]) == (
        None,
        None,
        None,
    )
    assert (record["venue"]["latitude"], record["venue"]["longitude"]) == (None, None)


def test_descriptive_field_that_is_not_text_becomes_null() -> None:
    body = sample()
    body["user"]["gender"] = 1
    body["client"]["userAgent"] = ["Mozilla"]
    record = normalised(body)
    assert (record["user"]["gender"], record["client"]["userAgent"]) == (None, None)


# --- visit counts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "counts",
    [
        {"888": 7},
        {"888": "7"},
        {"888": 7.0},
        [{"venueId": 888, "count": 7}],
        [{"venueId": "888", "count": "7"}],
        [{"id": 888, "visitCount": 7}],
    ],
)
def test_visit_counts_as_object_or_list_give_counts_by_venue_id(counts: object) -> None:
    body = sample()
    body["user"]["visitCountsForVenues"] = counts
    assert normalised(body)["visitCounts"] == {"888": 7}


@pytest.mark.parametrize("count", [999_999_999_999_999_999, 1e17])
def test_visit_counts_of_18_digits_are_kept(count: float) -> None:
    body = sample()
    body["user"]["visitCountsForVenues"] = {"888": count}
    assert normalised(body)["visitCounts"] == {"888": int(count)}


def test_visit_counts_at_top_level_are_read_too() -> None:
    body = sample()
    del body["user"]["visitCountsForVenues"]
    body["visitCountForVenues"] = {"888": 7, "889": 0}
    assert normalised(body)["visitCounts"] == {"888": 7, "889": 0}


def test_empty_visit_counts_are_an_empty_object() -> None:
    body = sample()
    body["user"]["visitCountsForVenues"] = {}
    assert normalised(body)["visitCounts"] == {}


# --- errors -------------------------------------------------------------------------------


def _altered(path: str, value: object) -> bytes:
    """The documented sample with the field at a dotted path set (``None``: removed)."""
    body = sample()
    *parents, name = path.split(".")
    holder = body
    for parent in parents:
        holder = holder[parent]
    if value is None:
        holder.pop(name, None)
    else:
        holder[name] = value
    return orjson.dumps(body)


TIME = "session.authenticationTime"
COUNTS = "user.visitCountsForVenues"
NO_ID = {"session": MINIMAL_BODY["session"]}
REPEATED = [{"venueId": 1, "count": 1}, {"venueId": "1", "count": 2}]

ERROR_CASES = [
    pytest.param(b'{"user": {"email": "a@b.c"', Reason.INVALID_JSON, id="not-json"),
    pytest.param(b'{"x": "\xff"}', Reason.INVALID_JSON, id="not-utf8"),
    pytest.param(b"", Reason.INVALID_JSON, id="empty-body"),
    pytest.param(b"[1, 2]", Reason.NOT_AN_OBJECT, id="array-body"),
    pytest.param(b'"login"', Reason.NOT_AN_OBJECT, id="string-body"),
    pytest.param(_altered("user", "Webhook Test"), Reason.BAD_SECTION, id="user-is-text"),
    pytest.param(_altered("session", ["2018"]), Reason.BAD_SECTION, id="session-is-array"),
    pytest.param(_altered("user.venue", "Venue"), Reason.BAD_SECTION, id="user-venue-is-text"),
    pytest.param(_altered("session", None), Reason.MISSING_AUTHENTICATION_TIME, id="no-session"),
    pytest.param(_altered(TIME, None), Reason.MISSING_AUTHENTICATION_TIME, id="no-time"),
    pytest.param(_altered(TIME, ""), Reason.MISSING_AUTHENTICATION_TIME, id="empty-time"),
    pytest.param(_altered(TIME, "yesterday"), Reason.BAD_AUTHENTICATION_TIME, id="not-a-time"),
    pytest.param(
        _altered(TIME, "2018-01-18T13:27:08"), Reason.BAD_AUTHENTICATION_TIME, id="no-offset"
    ),
    pytest.param(_altered(TIME, 1516282028), Reason.BAD_AUTHENTICATION_TIME, id="epoch-number"),
    pytest.param(
        _altered(TIME, "9999-12-31T23:59:59-01:00"),
        Reason.BAD_AUTHENTICATION_TIME,
        id="utc-past-year-9999",
    ),
    pytest.param(orjson.dumps(NO_ID), Reason.MISSING_USER_ID, id="no-user-id-nor-mac"),
    pytest.param(
        orjson.dumps({**NO_ID, "user": {"id": " "}}), Reason.MISSING_USER_ID, id="blank-user-id"
    ),
    pytest.param(_altered("user.id", True), Reason.BAD_ID, id="user-id-is-boolean"),
    pytest.param(_altered("user.id", {"id": 888}), Reason.BAD_ID, id="user-id-is-object"),
    pytest.param(_altered("user.venue.id", 888.5), Reason.BAD_ID, id="venue-id-is-fraction"),
    pytest.param(_altered("company.id", [999]), Reason.BAD_ID, id="company-id-is-array"),
    pytest.param(_altered("user.venue.latitude", "north"), Reason.BAD_COORDINATES, id="not-number"),
    pytest.param(_altered("user.venue.latitude", "90.5"), Reason.BAD_COORDINATES, id="lat-over-90"),
    pytest.param(
        _altered("user.venue.longitude", -180.01), Reason.BAD_COORDINATES, id="lon-over-180"
    ),
    pytest.param(_altered("user.venue.longitude", "nan"), Reason.BAD_COORDINATES, id="lon-is-nan"),
    pytest.param(_altered("user.venue.latitude", True), Reason.BAD_COORDINATES, id="lat-is-bool"),
    pytest.param(_altered(COUNTS, "7"), Reason.BAD_VISIT_COUNTS, id="counts-are-text"),
    pytest.param(_altered(COUNTS, {"888": -1}), Reason.BAD_VISIT_COUNTS, id="negative-count"),
    pytest.param(_altered(COUNTS, {"888": 1.5}), Reason.BAD_VISIT_COUNTS, id="fractional-count"),
    pytest.param(
        _altered(COUNTS, {"888": "1" * 5000}), Reason.BAD_VISIT_COUNTS, id="count-of-5000-digits"
    ),
    # Whole floats beyond 64 bits: orjson cannot write the integer they stand for.
    pytest.param(_altered(COUNTS, {"888": 1e20}), Reason.BAD_VISIT_COUNTS, id="count-1e20"),
    pytest.param(
        _altered(COUNTS, [{"venueId": 888, "count": 1e300}]),
        Reason.BAD_VISIT_COUNTS,
        id="entry-count-1e300",
    ),
    pytest.param(
        _altered(COUNTS, {"888": 10**18}), Reason.BAD_VISIT_COUNTS, id="count-of-19-digits"
    ),
    pytest.param(_altered(COUNTS, {"": 1}), Reason.BAD_VISIT_COUNTS, id="empty-venue-key"),
    pytest.param(_altered(COUNTS, [7]), Reason.BAD_VISIT_COUNTS, id="entry-not-an-object"),
    pytest.param(
        _altered(COUNTS, [{"venueId": 888}]), Reason.BAD_VISIT_COUNTS, id="entry-without-count"
    ),
    pytest.param(_altered(COUNTS, REPEATED), Reason.BAD_VISIT_COUNTS, id="repeated-venue"),
]


@pytest.mark.parametrize(("raw", "reason"), ERROR_CASES)
def test_body_that_cannot_be_normalised_raises_its_reason(raw: bytes, reason: Reason) -> None:
    assert reason_of(raw) is reason


def test_every_reason_has_a_case() -> None:
    # These two are the partition pipeline's (its receive time, its safety net): test_partition.
    by_the_partition = {Reason.FUTURE_AUTHENTICATION_TIME, Reason.UNREADABLE}
    assert {case.values[1] for case in ERROR_CASES} == set(Reason) - by_the_partition


def test_normalisation_error_belongs_to_the_project_error_tree() -> None:
    with pytest.raises(WifiBridgeError) as caught:
        normalise(b"[]")
    assert caught.value.code == "normalisation_error"
    assert caught.value.retryable is False


PERSONAL = {
    "email": "jane.doe@example.org",
    "firstName": "Jane",
    "lastName": "Doe-Smith",
    "dateOfBirth": "1985-07-14",
}


def _personal_body(**session: object) -> dict[str, Any]:
    body = sample()
    body["user"].update(PERSONAL)
    body["session"].update(session)
    return body


@pytest.mark.parametrize(
    "raw",
    [
        orjson.dumps(_personal_body())[:-7],
        orjson.dumps([_personal_body()]),
        orjson.dumps(_personal_body(authenticationTime="Jane 1985-07-14")),
        orjson.dumps({**_personal_body(), "user": {**PERSONAL, "id": {"name": "Jane"}}}),
        orjson.dumps({**_personal_body(), "user": PERSONAL, "client": {}}),
        orjson.dumps({**_personal_body(), "user": {**PERSONAL, "visitCountsForVenues": "Jane"}}),
        orjson.dumps({**_personal_body(), "venue": "Jane's house"}),
    ],
    ids=["invalid_json", "not_an_object", "bad_time", "bad_id", "no_id", "bad_counts", "section"],
)
def test_error_messages_carry_no_personal_data(raw: bytes) -> None:
    with pytest.raises(NormalisationError) as caught:
        normalise(raw)
    message = str(caught.value)
    assert message
    for value in (*PERSONAL.values(), "Jane", "1985"):
        assert value not in message


# --- schema -------------------------------------------------------------------------------

# The keywords the tiny checker below understands; ``format`` is an annotation in 2020-12.
KNOWN_KEYWORDS = {
    "$schema", "$id", "title", "description", "format",
    "type", "required", "properties", "additionalProperties",
    "pattern", "minLength", "minimum", "maximum",
}  # fmt: skip

JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "null": (type(None),),
}


def load_schema() -> dict[str, Any]:
    schema: dict[str, Any] = orjson.loads(SCHEMA_PATH.read_bytes())
    return schema


def _has_type(value: object, name: str) -> bool:
    if isinstance(value, bool) and name != "boolean":
        return False
    return isinstance(value, JSON_TYPES[name])


def violations(value: object, schema: dict[str, Any], path: str = "$") -> list[str]:
    """What in ``value`` breaks ``schema``: a minimal JSON Schema check (jsonschema is absent)."""
    expected = schema.get("type")
    if expected is not None:
        names = expected if isinstance(expected, list) else [expected]
        if not any(_has_type(value, name) for name in names):
            return [f"{path}: not {names}"]
    found: list[str] = []
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            found.append(f"{path}: shorter than minLength")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            found.append(f"{path}: does not match pattern")
    if isinstance(value, int | float) and not schema.get("minimum", value) <= value <= schema.get(
        "maximum", value
    ):
        found.append(f"{path}: out of range")
    if isinstance(value, dict):
        found += [
            f"{path}.{key}: missing" for key in schema.get("required", ()) if key not in value
        ]
        properties: dict[str, Any] = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                found += violations(item, properties[key], f"{path}.{key}")
            elif extra is False:
                found.append(f"{path}: unexpected {key}")
            elif isinstance(extra, dict):
                found += violations(item, extra, f"{path}.{key}")
    return found


def _keywords(schema: dict[str, Any]) -> set[str]:
    keywords = set(schema)
    for sub in schema.get("properties", {}).values():
        keywords |= _keywords(sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        keywords |= _keywords(extra)
    return keywords


def test_schema_is_draft_2020_12_and_uses_only_checked_keywords() -> None:
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert _keywords(schema) <= KNOWN_KEYWORDS


@pytest.mark.parametrize(
    "raw",
    [
        DOCUMENTED_SAMPLE,
        TABLE_VARIANT,
        orjson.dumps(MINIMAL_BODY),
        orjson.dumps({"session": MINIMAL_BODY["session"], "client": {"mac": "00-01-02-03-04-05"}}),
    ],
    ids=["documented-sample", "table-variant", "minimal", "mac-only"],
)
def test_normalised_records_conform_to_the_schema(raw: bytes) -> None:
    record = normalise(raw, received_at_ms=1_516_282_030_042)
    assert violations(record, load_schema()) == []
    assert violations(normalise(raw), load_schema()) == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.pop("late"), "late"),
        (lambda r: r["user"].update(id=888), "user.id"),
        (lambda r: r.update(authenticationTime="2018-01-18T13:27:08+00:00"), "authenticationTime"),
        (lambda r: r["venue"].update(latitude=91.0), "venue.latitude"),
        (lambda r: r.update(visitCounts={"888": True}), "visitCounts.888"),
        (lambda r: r["client"].update(ip="10.0.0.1"), "client"),
    ],
    ids=["missing", "wrong-type", "pattern", "range", "bool-is-not-integer", "extra-field"],
)
def test_schema_check_rejects_a_record_that_breaks_it(change: Any, field: str) -> None:
    record = normalise(DOCUMENTED_SAMPLE)
    change(record)
    found = violations(record, load_schema())
    assert found
    assert any(problem.startswith(f"$.{field}") for problem in found)
