"""The sandbox CRM API: a real server subprocess, real HTTP (plus a few in-process unit checks).

One server is started for the module (and reset before each test), with its own random key so
that the tests can check the key never shows up where it must not.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_assets.contract import (
    CRM_RESOURCES,
    RESOURCE_NAMES,
    CrmColumn,
    CrmResource,
    get_resource,
    parse_timestamp,
    record_problems,
)
from crm_assets.sandbox import SandboxClient, SandboxError, SandboxServer
from crm_assets.sandbox.__main__ import loopback_host, parse_records
from crm_assets.sandbox.app import MALFORMED_KINDS, SandboxApp
from crm_assets.sandbox.data import SandboxStore, format_us, from_us, parse_us
from crm_assets.sandbox.server import SandboxStartError

KEY = f"sandbox-test-{uuid.uuid4().hex}"
SEED = 11
COUNTS = {"notes": 300, "deals": 250, "accounts": 120, "calls": 205}
STARTUP: dict[str, float] = {}


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    started = time.perf_counter()
    with SandboxServer(records=COUNTS, seed=SEED, api_key=KEY) as sandbox:
        STARTUP["seconds"] = time.perf_counter() - started
        yield sandbox


@pytest.fixture(scope="module")
def initial(server: SandboxServer) -> dict[str, list[dict[str, Any]]]:
    """The generated records, fetched once (every test starts from this state)."""
    server.client.reset()
    return {name: server.client.records(name) for name in RESOURCE_NAMES}


@pytest.fixture(autouse=True)
def _fresh(server: SandboxServer) -> None:
    server.client.reset()


@pytest.fixture
def client(server: SandboxServer) -> SandboxClient:
    return server.client


def get(server: SandboxServer, resource: str, timeout: float = 10, **params: Any):
    params.setdefault("api_key", KEY)
    return requests.get(f"{server.url}/v1/{resource}", params=params, timeout=timeout)


def page(server: SandboxServer, resource: str, **params: Any) -> dict[str, Any]:
    response = get(server, resource, **params)
    assert response.status_code == 200, response.text
    return response.json()


def fetch_all(server: SandboxServer, resource: str, limit: int = 100, **params: Any):
    records, totals, offset = [], set(), 0
    while True:
        body = page(server, resource, offset=offset, limit=limit, **params)
        records.extend(body["data"])
        totals.add(body["total"])
        if len(body["data"]) < limit:
            return records, totals
        offset += limit


def order_key(record: dict[str, Any]) -> tuple[int, str]:
    return parse_us(record["updated_at"]), record["id"]


def tie_timestamp(records: list[dict[str, Any]]) -> str:
    counts = collections.Counter(r["updated_at"] for r in records)
    return next(ts for ts, n in counts.items() if n >= 2)


# --- generated data --------------------------------------------------------------------------


@pytest.mark.parametrize("resource", RESOURCE_NAMES)
def test_generated_records_are_realistic_and_follow_the_contract(
    resource: str, initial: dict[str, list[dict[str, Any]]], server: SandboxServer
) -> None:
    contract = get_resource(resource)
    records = initial[resource]
    assert len(records) == COUNTS[resource]
    assert STARTUP["seconds"] < 5
    for record in records:
        assert record_problems(contract, record) == []
        assert list(record) == [c.name for c in contract.columns]
        assert re.fullmatch(rf"{resource[:3]}_\d{{7}}", record["id"])
        assert record["created_at"] <= record["updated_at"]
        # Generated timestamps are whole minutes in 2024-2025.
        assert re.fullmatch(r"202[45]-\d\d-\d\dT\d\d:\d\d:00Z", record["updated_at"])
        for column in contract.columns:
            value = record[column.name]
            if column.name.endswith("_id") and value is not None:
                assert re.fullmatch(r"[a-z]{3}_\d{7}", value)
    ties = collections.Counter(r["updated_at"] for r in records)
    assert sum(n for n in ties.values() if n > 1) >= 0.05 * len(records)
    nullable = [c.name for c in contract.columns if c.nullable]
    values = [r[name] for r in records for name in nullable]
    assert 0.08 < sum(v is None for v in values) / len(values) < 0.25
    text = [r[c.name] for r in records for c in contract.columns if c.type == "text"]
    assert any(isinstance(v, str) and not v.isascii() for v in text)
    # Money is written with exactly two decimals on the wire (2.50, never 2.5).
    raw = get(server, resource, limit=100).text
    for column in (c for c in contract.columns if c.type == "decimal"):
        for match in re.finditer(rf'"{column.name}":([^,}}]+)', raw):
            assert re.fullmatch(r"null|\d+\.\d\d", match.group(1))


def test_well_known_fields_get_sensible_values(initial: dict[str, list[dict[str, Any]]]) -> None:
    deals, accounts, notes = initial["deals"], initial["accounts"], initial["notes"]
    assert all(d["is_closed"] == d["stage"].startswith("closed") for d in deals)
    assert all(re.fullmatch(r"[A-Z]{3}", d["currency"]) for d in deals if d["currency"])
    assert all(d["account_id"].startswith("acc_") for d in deals if d["account_id"])
    assert all(a["website"].startswith("http") for a in accounts if a["website"])
    assert all(a["employee_count"] >= 0 for a in accounts if a["employee_count"] is not None)
    assert any("\n" in n["body"] for n in notes if n["body"])
    assert any('"' in n["body"] or "'" in n["body"] for n in notes if n["body"])


def test_generation_is_deterministic_across_processes(
    initial: dict[str, list[dict[str, Any]]],
) -> None:
    # The server generated its data in another process (another PYTHONHASHSEED).
    store = SandboxStore(COUNTS, seed=SEED)
    for name in RESOURCE_NAMES:
        local = [orjson.loads(b) for b in store.tables[name].all_json()]
        assert local == initial[name], name
    other = SandboxStore(COUNTS, seed=SEED + 1)
    assert [orjson.loads(b) for b in other.tables["deals"].all_json()] != initial["deals"]


def test_a_fifth_resource_is_served_with_no_other_change() -> None:
    contacts = CrmResource(
        name="contacts",
        description="People.",
        fields=(
            CrmColumn("name", "text"),
            CrmColumn("email", "text", nullable=True),
            CrmColumn("account_id", "text", nullable=True),
            CrmColumn("tier", "text", choices=("gold", "silver")),
            CrmColumn("mystery_field", "text"),
            CrmColumn("score", "bigint"),
            CrmColumn("lifetime_value", "decimal", nullable=True),
            CrmColumn("is_vip", "bool"),
            CrmColumn("birthday", "date", nullable=True),
            CrmColumn("last_seen_at", "timestamp", nullable=True),
        ),
    )
    store = SandboxStore(50, seed=3, resources=(*CRM_RESOURCES, contacts))
    app = SandboxApp(store, api_key="k")

    async def call(path: str, query: bytes) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "query_string": query}
        await app(scope, receive, send)
        return sent[0]["status"], sent[1]["body"]

    status, body = asyncio.run(call("/v1/contacts", b"api_key=k&limit=100"))
    assert status == 200
    data = orjson.loads(body)
    assert data["total"] == 50
    for record in data["data"]:
        assert record_problems(contacts, record) == []
        assert record["id"].startswith("con_")
        assert record["account_id"] is None or record["account_id"].startswith("acc_")
        assert record["email"] is None or "@" in record["email"]


# --- the data API ----------------------------------------------------------------------------


@pytest.mark.parametrize("resource", RESOURCE_NAMES)
def test_pages_concatenate_to_all_records_in_contract_order(
    resource: str, server: SandboxServer, initial: dict[str, list[dict[str, Any]]]
) -> None:
    records, totals = fetch_all(server, resource)
    assert records == initial[resource]
    assert totals == {COUNTS[resource]}
    assert records == sorted(records, key=order_key)
    assert len({r["id"] for r in records}) == len(records)
    small, _ = fetch_all(server, resource, limit=7)
    assert small == records


def test_defaults_and_offsets_past_the_end(server: SandboxServer) -> None:
    body = page(server, "deals")
    assert len(body["data"]) == 100
    assert page(server, "deals", offset=0, limit=100) == body
    assert page(server, "deals", offset=10_000) == {"data": [], "total": COUNTS["deals"]}


def test_updated_since_includes_ties_and_accepts_every_utc_spelling(
    server: SandboxServer, initial: dict[str, list[dict[str, Any]]]
) -> None:
    records = initial["calls"]
    tie = tie_timestamp(records)
    instant = parse_timestamp(tie)
    expected = [r for r in records if r["updated_at"] >= tie]
    assert sum(r["updated_at"] == tie for r in expected) >= 2
    spellings = [
        tie,
        tie.replace("Z", "+00:00"),
        tie.replace("Z", ".000Z"),
        tie.replace("Z", ".000000+00:00"),
        instant.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat(),
        instant.astimezone(dt.timezone(dt.timedelta(hours=-5, minutes=-30))).isoformat(),
    ]
    for since in spellings:
        got, totals = fetch_all(server, "calls", updated_since=since)
        assert got == expected, since
        assert totals == {len(expected)}, since


def test_updated_since_compares_instants_not_strings(
    server: SandboxServer, initial: dict[str, list[dict[str, Any]]]
) -> None:
    records = initial["deals"]
    tie = tie_timestamp(records)
    # "...:00.5Z" sorts before "...:00Z" as a string but is half a second later.
    half_second_later = tie.replace("Z", ".5Z")
    got, _ = fetch_all(server, "deals", updated_since=half_second_later)
    assert got == [r for r in records if r["updated_at"] > tie]
    # A later wall-clock string in another offset is the same instant.
    plus_one = (parse_timestamp(tie) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+01:00")
    assert fetch_all(server, "deals", updated_since=plus_one)[0] == [
        r for r in records if r["updated_at"] >= tie
    ]


@given(data=st.data())
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_window_matches_a_brute_force_filter(
    server: SandboxServer, initial: dict[str, list[dict[str, Any]]], data: st.DataObject
) -> None:
    resource = data.draw(st.sampled_from(RESOURCE_NAMES))
    records = initial[resource]
    base = parse_us(data.draw(st.sampled_from(records))["updated_at"])
    since_us = base + data.draw(st.sampled_from([-1, 0, 1, 30_000_000, -60_000_000]))
    hours = data.draw(st.integers(-12, 14))
    since = from_us(since_us).astimezone(dt.timezone(dt.timedelta(hours=hours))).isoformat()
    offset = data.draw(st.integers(0, len(records) + 5))
    limit = data.draw(st.integers(1, 100))
    matching = [r for r in records if parse_us(r["updated_at"]) >= since_us]
    body = page(server, resource, offset=offset, limit=limit, updated_since=since)
    assert body == {"data": matching[offset : offset + limit], "total": len(matching)}


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("", 401),
        ("api_key=wrong-key-value", 401),
        ("api_key=", 401),
        ("api_key={key}&offset=-1", 400),
        ("api_key={key}&offset=abc", 400),
        ("api_key={key}&offset=1.5", 400),
        ("api_key={key}&limit=0", 400),
        ("api_key={key}&limit=101", 400),
        ("api_key={key}&limit=ten", 400),
        ("api_key={key}&offset=0&offset=100", 400),
        ("api_key={key}&updated_since=yesterday", 400),
        ("api_key={key}&updated_since=2025-03-01T12:00:00", 400),
        ("api_key={key}&updated_since=2025-03-01", 400),
        # An unencoded "+" is a space in a query string: rejected with a hint, not misread.
        ("api_key={key}&updated_since=2025-03-01T12:00:00+00:00", 400),
    ],
)
def test_bad_requests_get_json_errors(server: SandboxServer, query: str, status: int) -> None:
    response = requests.get(f"{server.url}/v1/deals?{query.format(key=KEY)}", timeout=10)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["error"], str)
    assert KEY not in response.text and "wrong-key-value" not in response.text


def test_unknown_resources_and_paths_are_404(server: SandboxServer) -> None:
    for path in ("/v1/contacts", "/v2/deals", "/"):
        response = requests.get(f"{server.url}{path}", params={"api_key": KEY}, timeout=10)
        assert response.status_code == 404
        assert "error" in response.json()


def test_request_log_records_parameter_names_but_never_the_key(
    server: SandboxServer, client: SandboxClient
) -> None:
    get(server, "deals", offset=100, limit=50, updated_since="2025-01-01T00:00:00Z")
    get(server, "deals", api_key="not-the-key-xyz")
    requests.get(f"{server.url}/v1/notes?limit=5", timeout=10)
    log = client.request_log()
    assert [(e["resource"], e["status"], e["api_key_ok"]) for e in log] == [
        ("deals", 200, True),
        ("deals", 401, False),
        ("notes", 401, False),
    ]
    assert log[0]["offset"] == 100 and log[0]["limit"] == 50
    assert log[0]["updated_since"] == "2025-01-01T00:00:00Z"
    assert log[0]["query_keys"] == ["offset", "limit", "updated_since", "api_key"]
    assert log[2]["query_keys"] == ["limit"]
    assert [e["resource"] for e in client.request_log("notes")] == ["notes"]
    text = json.dumps(log) + json.dumps(client.state())
    assert KEY not in text and "not-the-key-xyz" not in text
    client.reset_log()
    assert client.request_log() == []


# --- faults ----------------------------------------------------------------------------------


def test_status_fault_with_retry_after(server: SandboxServer, client: SandboxClient) -> None:
    client.add_fault(resource="deals", status=429, retry_after=3)
    response = get(server, "deals")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3"
    assert "error" in response.json()
    assert get(server, "deals").status_code == 200
    assert client.request_log()[0]["fault"] == "status=429"


def test_fault_after_count_offset_and_wildcard(
    server: SandboxServer, client: SandboxClient
) -> None:
    client.add_fault(resource="deals", status=503, after=1, count=2)
    assert [get(server, "deals").status_code for _ in range(4)] == [200, 503, 503, 200]
    client.add_fault(resource="*", status=500, offset=100)
    assert get(server, "notes", offset=0).status_code == 200
    assert get(server, "notes", offset=100).status_code == 500
    assert get(server, "notes", offset=100).status_code == 200
    client.add_fault(status=401)
    assert get(server, "calls").status_code == 401
    assert client.faults() == []


def test_faults_are_consumed_in_order(server: SandboxServer, client: SandboxClient) -> None:
    client.add_faults([{"resource": "accounts", "status": 503}, {"status": 500}])
    statuses = [get(server, "accounts").status_code for _ in range(3)]
    assert statuses == [503, 500, 200]


def test_bad_fault_rules_are_rejected(client: SandboxClient) -> None:
    for rule in (
        {"status": 500, "malformed": "truncated"},
        {"malformed": "nonsense"},
        {"resource": "contacts", "status": 500},
        {"status": 500, "cout": 2},
        {"hang_seconds": 1, "retry_after": 2},
    ):
        with pytest.raises(SandboxError) as error:
            client.add_faults([rule])
        assert error.value.status == 400
    assert client.faults() == []


def test_hang_fault_times_out_the_client(server: SandboxServer, client: SandboxClient) -> None:
    client.add_fault(resource="calls", hang_seconds=1.5)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        get(server, "calls", timeout=0.3)
    assert time.monotonic() - started < 1.2
    assert get(server, "calls").status_code == 200


def _normal_and_faulted(
    server: SandboxServer, client: SandboxClient, resource: str, kind: str
) -> tuple[requests.Response, requests.Response]:
    normal = get(server, resource, offset=100, limit=30)
    client.add_fault(resource=resource, malformed=kind)
    return normal, get(server, resource, offset=100, limit=30)


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_malformed_responses(server: SandboxServer, client: SandboxClient, kind: str) -> None:
    resource = "calls"
    normal, bad = _normal_and_faulted(server, client, resource, kind)
    assert bad.status_code == 200
    expected = normal.json()
    if kind in ("not_json", "truncated"):
        with pytest.raises(ValueError):
            bad.json()
        if kind == "not_json":
            assert bad.headers["content-type"].startswith("text/html")
        else:
            assert normal.content.startswith(bad.content)
            assert 0 < len(bad.content) < len(normal.content)
        return
    body = bad.json()
    if kind == "missing_data":
        assert body == {"total": expected["total"]}
    elif kind == "data_not_list":
        assert body == {"data": {"x": 1}, "total": expected["total"]}
    elif kind == "error_key":
        assert body == {"error": "internal", "data": [], "total": expected["total"]}
    elif kind == "missing_total":
        assert body == {"data": expected["data"]}
    else:
        assert body["total"] == expected["total"]
        changed = [(b, e) for b, e in zip(body["data"], expected["data"], strict=True) if b != e]
        assert len(changed) == 1
        damaged, original = changed[0]
        if kind == "record_without_id":
            assert "id" not in damaged
        elif kind == "record_without_cursor":
            assert "updated_at" not in damaged and damaged["id"] == original["id"]
        else:
            problems = record_problems(get_resource(resource), damaged)
            assert problems == ["duration_seconds: expected bigint, got str"]


@pytest.mark.parametrize(("resource", "field"), [("deals", "is_closed"), ("notes", "created_at")])
def test_bad_value_uses_a_field_of_the_wrong_type(
    server: SandboxServer, client: SandboxClient, resource: str, field: str
) -> None:
    client.add_fault(resource=resource, malformed="record_bad_value")
    records = page(server, resource, limit=10)["data"]
    problems = [p for r in records for p in record_problems(get_resource(resource), r)]
    assert len(problems) == 1 and problems[0].startswith(f"{field}: expected")


def test_latency_is_added_and_concurrent_requests_overlap(
    server: SandboxServer, client: SandboxClient
) -> None:
    client.set_latency(300)
    started = time.monotonic()
    assert get(server, "deals").status_code == 200
    assert time.monotonic() - started >= 0.3
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(get(server, "notes").status_code))
        for _ in range(4)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 4
    assert time.monotonic() - started < 0.9  # 4 x 300 ms if they were serialized
    client.set_latency(0)
    started = time.monotonic()
    get(server, "deals")
    assert time.monotonic() - started < 0.3


# --- mutations -------------------------------------------------------------------------------


def test_update_moves_records_to_the_end_with_one_shared_timestamp(
    client: SandboxClient, initial: dict[str, list[dict[str, Any]]]
) -> None:
    before = initial["deals"]
    ids = client.update("deals", count=3)
    positions = sorted(i for i, r in enumerate(before) if r["id"] in ids)
    assert positions[0] < len(before) / 3 and positions[-1] > 2 * len(before) / 3
    after = client.records("deals")
    assert len(after) == len(before)
    moved = after[-3:]
    assert [r["id"] for r in moved] == sorted(ids)
    assert len({r["updated_at"] for r in moved}) == 1
    assert moved[0]["updated_at"] > before[-1]["updated_at"]
    old = {r["id"]: r for r in before}
    for record in moved:
        previous = old[record["id"]]
        assert record["created_at"] == previous["created_at"]
        changed = {k for k in record if record[k] != previous[k]} - {"updated_at"}
        # One field, plus is_closed when the stage changed; never the id or created_at.
        assert changed and not changed & {"id", "created_at"}, changed
        assert len(changed - {"is_closed"}) == 1, changed
        assert record_problems(get_resource("deals"), record) == []
    # Every touched record really changes (is_closed alone is derived and cannot change).
    touched = client.update("deals", fraction=1.0)
    now = {r["id"]: r for r in client.records("deals")}
    assert all(now[i] != {**old[i], "updated_at": now[i]["updated_at"]} for i in touched)
    again = client.update("deals", ids=[before[0]["id"]])
    last = client.records("deals")[-1]
    assert last["id"] == again[0]
    assert parse_us(last["updated_at"]) - parse_us(moved[0]["updated_at"]) == 2_000_000


def test_update_by_fraction_spreads_over_the_order(
    client: SandboxClient, initial: dict[str, list[dict[str, Any]]]
) -> None:
    before = [r["id"] for r in initial["notes"]]
    ids = client.update("notes", fraction=0.1)
    assert len(ids) == 30
    positions = sorted(before.index(i) for i in ids)
    assert positions[0] < 30 and positions[-1] > 270


def test_add_continues_numbering_and_can_tie_with_the_max(client: SandboxClient) -> None:
    ids = client.add("accounts", count=2)
    assert ids == ["acc_0000121", "acc_0000122"]
    maximum = client.max_updated_at()["accounts"]
    tied = client.add("accounts", count=1, tie_with_max=True)
    records = client.records("accounts")
    assert [r["id"] for r in records[-3:]] == [*ids, *tied]
    assert records[-1]["updated_at"] == maximum == records[-2]["updated_at"]
    assert client.counts()["accounts"] == 123
    assert all(record_problems(get_resource("accounts"), r) == [] for r in records[-3:])


def test_delete_by_ids_and_count(client: SandboxClient, initial: dict[str, Any]) -> None:
    first = initial["calls"][0]["id"]
    assert client.delete("calls", ids=[first]) == [first]
    assert len(client.delete("calls", count=2)) == 2
    remaining = {r["id"] for r in client.records("calls")}
    assert first not in remaining and len(remaining) == COUNTS["calls"] - 3
    with pytest.raises(SandboxError) as error:
        client.delete("calls", ids=[first])
    assert error.value.status == 404
    with pytest.raises(SandboxError):
        client.update("calls")  # neither ids, count nor fraction


def test_scheduled_update_moves_a_record_between_page_requests(
    server: SandboxServer, client: SandboxClient, initial: dict[str, list[dict[str, Any]]]
) -> None:
    before = initial["deals"]
    first = before[0]["id"]
    assert client.schedule("deals", before_request=2, action="update", ids=[first]) == [first]
    pages = [page(server, "deals", offset=o)["data"] for o in (0, 100, 200)]
    seen = [r["id"] for p in pages for r in p]
    # Offset pagination across the move: the moved record twice, its successor never.
    assert seen.count(first) == 2 and seen[-1] == first
    assert before[100]["id"] not in seen
    assert pages[1] == before[101:201]
    log = client.request_log("deals")
    assert log[1]["scheduled"] == [{"action": "update", "ids": [first]}]
    assert client.schedules() == []


def test_scheduled_add_and_delete(server: SandboxServer, client: SandboxClient) -> None:
    added = client.schedule("notes", before_request=1, action="add", count=2, tie_with_max=True)
    assert added == ["not_0000301", "not_0000302"]
    doomed = client.schedule("notes", before_request=2, action="delete", count=1)
    maximum = client.max_updated_at()["notes"]
    assert client.counts()["notes"] == COUNTS["notes"]
    assert page(server, "notes", limit=1)["total"] == COUNTS["notes"] + 2
    tail = client.records("notes")[-2:]
    assert [r["id"] for r in tail] == added and {r["updated_at"] for r in tail} == {maximum}
    assert doomed[0] in {r["id"] for r in client.records("notes")}
    assert page(server, "notes", limit=1)["total"] == COUNTS["notes"] + 1
    assert doomed[0] not in {r["id"] for r in client.records("notes")}


def test_reset_restores_the_generated_state(
    server: SandboxServer, client: SandboxClient, initial: dict[str, list[dict[str, Any]]]
) -> None:
    client.update("deals", fraction=0.5)
    client.add("deals", count=3)
    client.delete("notes", count=10)
    client.add_fault(status=500)
    client.schedule("calls", before_request=5, action="delete", count=1)
    client.set_latency(5)
    get(server, "accounts")
    client.reset()
    assert {n: client.records(n) for n in RESOURCE_NAMES} == initial
    state = client.state()
    assert state["faults"] == [] and state["schedules"] == [] and state["latency_ms"] == 0
    assert client.request_log() == []
    assert client.add("deals") == [f"dea_{COUNTS['deals'] + 1:07d}"]


# --- CLI and process management --------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.4.5.6", "localhost", "::1", "[::1]"])
def test_loopback_hosts_are_accepted(host: str) -> None:
    assert loopback_host(host) in ("127.0.0.1", "127.4.5.6", "::1")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "192.168.1.20", "example.com"])
def test_other_hosts_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        loopback_host(host)


def test_the_cli_refuses_a_public_host() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "crm_assets.sandbox", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "loopback" in result.stderr
    assert result.stdout == ""


def test_parse_records() -> None:
    assert parse_records("500") == dict.fromkeys(RESOURCE_NAMES, 500)
    assert parse_records("notes=10,deals=20")["notes"] == 10
    assert parse_records("notes=10,deals=20")["calls"] == 1000
    assert parse_records("5,deals=2") == {**dict.fromkeys(RESOURCE_NAMES, 5), "deals": 2}
    for bad in ("nope=1", "deals=-1", "deals=x"):
        with pytest.raises(ValueError):
            parse_records(bad)


def test_a_failing_start_reports_the_child_stderr() -> None:
    with pytest.raises(SandboxStartError, match="unknown resource 'nope'"):
        SandboxServer(records={"nope": 1}).start()


def test_format_us_matches_the_contract() -> None:
    from crm_assets.contract import format_timestamp

    for us in (0, 1_740_830_400_000_000, 1_740_830_400_500_000, 1_740_830_459_000_001):
        assert format_us(us) == format_timestamp(from_us(us))
