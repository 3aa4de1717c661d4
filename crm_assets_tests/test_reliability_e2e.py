"""Reliability end to end: retries, clear failures, quarantine, new fields, hostile pagination.

Every test runs the real assets in this process against the sandbox CRM over HTTP (faults
injected through its control API, connection resets through ``FlakyProxy``) into a DuckDB file
under ``tmp_path``. Retry waits are shrunk through ``CrmApiResource`` fields, never patched;
nothing asserts on elapsed time: waits are checked in the retry lines the run logs, computed by
dlt's retrying session itself. ``docs/reliability.md`` maps every fault to its test here.
"""

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import requests
from dlt.sources.helpers.requests import Response
from tenacity import Future, RetryCallState

from crm_assets.contract import get_resource
from crm_assets.records import REJECTED_TABLE
from crm_assets.resources import CrmApiResource, CrmConfigurationError, check_base_url
from crm_assets.sandbox import FlakyProxy, SandboxClient, SandboxServer
from crm_assets.sandbox.app import EXTRA_FIELD_VALUE
from crm_assets.sync import describe_failure
from crm_assets_tests.conftest import CANARY_KEY, DEFAULT_RECORDS, Harness

# --- helpers shared with the secrets and crash tests -------------------------------------------


@pytest.fixture(autouse=True)
def no_dlt_telemetry(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dlt reports anonymous telemetry to the internet by default; tests talk to loopback only."""
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")


@pytest.fixture(scope="module")
def shared_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dg.DagsterInstance]:
    """One Dagster instance for the module: creating one per test costs about a second, and
    these tests look at their own run only (by run id)."""
    with dg.instance_for_test(temp_dir=str(tmp_path_factory.mktemp("dagster"))) as instance:
        yield instance


@pytest.fixture(name="harness")
def shared_instance_harness(
    isolated_env: Path,
    sandbox: SandboxClient,
    sandbox_server: SandboxServer,
    shared_instance: dg.DagsterInstance,
) -> Harness:
    """conftest's Harness (fresh warehouse, reset sandbox) on the module's Dagster instance."""
    return Harness(isolated_env, sandbox_server.url, shared_instance)


def crm_api(base_url: str, **fields: Any) -> dict[str, CrmApiResource]:
    """The ``crm_api`` resource as deployed (the key from ``CRM_API_KEY``), retry waits shrunk."""
    values: dict[str, Any] = {
        "base_url": base_url,
        "api_key": dg.EnvVar("CRM_API_KEY"),
        "backoff_factor": 0.01,
        "max_retry_delay_seconds": 0.05,
        "request_timeout_seconds": 5.0,
    }
    values.update(fields)
    return {"crm_api": CrmApiResource(**values)}


def metadata_of(result: dg.ExecuteInProcessResult, resource: str) -> dict[str, Any]:
    """Materialization metadata of ``crm/<resource>`` as plain values."""
    for event in result.get_asset_materialization_events():
        if event.asset_key.path[-1] == resource:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    raise AssertionError(f"no materialization of {resource}")


def failure_of(result: dg.ExecuteInProcessResult) -> str:
    """The failed step's error as Dagster stores it: message, stack and causes, as text."""
    assert not result.success
    errors = [
        event.step_failure_data.error
        for event in result.all_events
        if event.event_type_value == "STEP_FAILURE"
    ]
    assert len(errors) == 1 and errors[0] is not None
    return errors[0].to_string()


def log_messages(harness: Harness, run_id: str) -> list[str]:
    """Every message the run logged (context.log and Dagster's own event messages)."""
    return [entry.message for entry in harness.instance.all_logs(run_id)]


def api_state(sandbox: SandboxClient, resource: str) -> dict[str, str]:
    """``id -> updated_at`` of every record the API serves now."""
    return {r["id"]: r["updated_at"] for r in sandbox.records(resource)}


def warehouse_state(harness: Harness, resource: str) -> dict[str, str]:
    """``id -> updated_at`` of the warehouse table (fails on duplicate ids)."""
    rows = harness.query(f"SELECT id, updated_at FROM crm.{resource}")
    state = {
        record_id: updated_at.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for record_id, updated_at in rows
    }
    assert len(state) == len(rows), f"duplicate ids in crm.{resource}"
    return state


def assert_equals_api(harness: Harness, sandbox: SandboxClient, resource: str) -> None:
    """The table holds exactly the API's records, each in its current version, once."""
    assert warehouse_state(harness, resource) == api_state(sandbox, resource), resource


def requests_at(sandbox: SandboxClient, resource: str) -> dict[int, list[dict[str, Any]]]:
    """The sandbox's request log of ``resource`` grouped by offset, in arrival order."""
    grouped: dict[int, list[dict[str, Any]]] = {}
    for entry in sandbox.request_log(resource):
        grouped.setdefault(entry["offset"] or 0, []).append(entry)
    return grouped


# --- retries: the policy ------------------------------------------------------------------------


def _retry_state(retrying: Any, attempt: int, outcome: BaseException) -> RetryCallState:
    state = RetryCallState(retrying, fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    future = Future(attempt)
    future.set_exception(outcome)
    state.outcome = future
    return state


def _http_error(status: int, retry_after: str | None = None) -> requests.HTTPError:
    response = Response()
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return requests.HTTPError(f"{status}", response=response)


def test_retry_policy_defaults_are_the_seeds() -> None:
    """4 attempts, waits 2/4/8 s, Retry-After honoured up to 60 s, 429/5xx/network retried only.

    Checked on the retrying session ``CrmApiResource`` builds (dlt's, with tenacity inside), by
    asking its policy objects, not by waiting.
    """
    resource = CrmApiResource(api_key="not-used")
    assert (resource.max_attempts, resource.backoff_factor) == (4, 2.0)
    assert resource.max_retry_delay_seconds == 60.0
    assert resource.request_timeout_seconds == 30.0
    session = resource.build_session()
    assert session.timeout == 30.0  # every request gets it (dlt's Session.send setdefault)
    retrying = session.send.retry  # type: ignore[attr-defined]

    assert retrying.stop.max_attempt_number == 4  # the first attempt + at most 3 retries
    waits = [retrying.wait(_retry_state(retrying, n, _http_error(503))) for n in (1, 2, 3)]
    assert waits == [2, 4, 8]
    honoured = retrying.wait(_retry_state(retrying, 1, _http_error(429, retry_after="7")))
    assert honoured == 7
    capped = retrying.wait(_retry_state(retrying, 1, _http_error(429, retry_after="3600")))
    assert capped == 60

    def retried(outcome: BaseException) -> bool:
        return bool(retrying.retry(_retry_state(retrying, 1, outcome)))

    for status in (429, 500, 502, 503, 504):
        assert retried(_http_error(status)), status
    for status in (400, 401, 403, 404, 422):
        assert not retried(_http_error(status)), status
    assert retried(requests.ConnectionError("reset"))
    assert retried(requests.ReadTimeout("slow"))
    assert retried(requests.ConnectTimeout("unreachable"))
    assert retried(requests.exceptions.ChunkedEncodingError("connection broken mid-answer"))
    assert not retried(ValueError("a bug is not transient"))


@pytest.mark.parametrize(
    "fields",
    [
        {"request_timeout_seconds": 0},
        {"max_attempts": 0},
        {"backoff_factor": -1},
        {"max_retry_delay_seconds": -1},
    ],
)
def test_nonsensical_retry_settings_are_rejected(fields: Mapping[str, Any]) -> None:
    with pytest.raises(Exception, match=next(iter(fields))):
        CrmApiResource(api_key="not-used", **fields)


# --- retries: end to end ------------------------------------------------------------------------


def test_transient_errors_are_retried_counted_and_logged(
    harness: Harness, sandbox: SandboxClient
) -> None:
    # deals has 3 pages. Each page meets different transient failures; the last one uses all
    # three retries (the 4th attempt succeeds). Rules at one offset fire oldest first.
    sandbox.add_faults(
        [
            {"resource": "deals", "offset": 0, "status": 429, "retry_after": 1},
            {"resource": "deals", "offset": 100, "status": 500},
            {"resource": "deals", "offset": 100, "status": 502},
            {"resource": "deals", "offset": 200, "status": 503},
            {"resource": "deals", "offset": 200, "status": 504},
            {"resource": "deals", "offset": 200, "hang_seconds": 3},
        ]
    )
    result = harness.materialize(
        resources=["deals"],
        # A timeout far above a page's answer time, so that only the hanging request times out.
        resource_overrides=crm_api(
            harness.base_url, request_timeout_seconds=1.0, max_retry_delay_seconds=1.0
        ),
    )
    assert result.success
    assert_equals_api(harness, sandbox, "deals")

    seen = requests_at(sandbox, "deals")
    assert [e["fault"] for e in seen[0]] == ["status=429", None]
    assert [e["fault"] for e in seen[100]] == ["status=500", "status=502", None]
    assert [e["fault"] for e in seen[200]] == ["status=503", "status=504", "hang_seconds=3", None]
    metadata = metadata_of(result, "deals")
    assert metadata["pages"] == 3
    assert metadata["retries"] == 6
    assert metadata["http_requests"] == sum(len(v) for v in seen.values()) == 9

    # The waits dlt's session computed: Retry-After (1 s, under the 1 s cap), then 0.01 * 2**n.
    retry_lines = [m for m in log_messages(harness, result.run_id) if "; retry " in m]
    assert retry_lines == [
        "deals: HTTP 429 (Retry-After: 1) at offset 0; retry 1 of 3 in 1s",
        "deals: HTTP 500 at offset 100; retry 1 of 3 in 0.01s",
        "deals: HTTP 502 at offset 100; retry 2 of 3 in 0.02s",
        "deals: HTTP 503 at offset 200; retry 1 of 3 in 0.01s",
        "deals: HTTP 504 at offset 200; retry 2 of 3 in 0.02s",
        "deals: ReadTimeout at offset 200; retry 3 of 3 in 0.04s",
    ]


def test_server_errors_give_up_after_four_attempts(
    harness: Harness, sandbox: SandboxClient
) -> None:
    sandbox.add_fault(resource="calls", offset=200, status=503, count=10)
    result = harness.materialize(
        resources=["calls"], raise_on_error=False, resource_overrides=crm_api(harness.base_url)
    )
    failure = failure_of(result)
    assert "CRM sync of calls failed: CRM API answered 503 for calls at offset 200" in failure
    seen = requests_at(sandbox, "calls")
    assert [e["status"] for e in seen[200]] == [503, 503, 503, 503]
    assert 300 not in seen  # nothing after the page that failed
    assert harness.query(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'calls'"
    ) == [(0,)]


def test_timeouts_are_retried_then_fail_naming_resource_and_offset(
    harness: Harness, sandbox: SandboxClient
) -> None:
    sandbox.add_fault(resource="accounts", offset=100, hang_seconds=3, count=10)
    result = harness.materialize(
        resources=["accounts"],
        raise_on_error=False,
        resource_overrides=crm_api(harness.base_url, request_timeout_seconds=0.3),
    )
    failure = failure_of(result)
    assert (
        "the CRM API did not answer accounts at offset 100 within the request timeout, "
        "also after every retry" in failure
    )
    assert [e["fault"] for e in requests_at(sandbox, "accounts")[100]] == ["hang_seconds=3"] * 4


def test_connection_resets_are_retried_and_counted(
    harness: Harness, sandbox: SandboxClient
) -> None:
    with FlakyProxy(harness.base_url, drop=1) as proxy:
        result = harness.materialize(resources=["notes"], resource_overrides=crm_api(proxy.url))
        assert proxy.dropped == 1
    assert result.success
    assert_equals_api(harness, sandbox, "notes")
    metadata = metadata_of(result, "notes")
    served = len(sandbox.request_log("notes"))
    # The reset attempt never reached the sandbox but is one of the run's HTTP requests.
    assert (metadata["http_requests"], metadata["retries"], served) == (4, 1, 3)
    assert [m for m in log_messages(harness, result.run_id) if "; retry " in m] == [
        "notes: ConnectionError at offset 0; retry 1 of 3 in 0.01s"
    ]


def test_connection_errors_give_up_after_four_attempts(
    harness: Harness, sandbox: SandboxClient
) -> None:
    with FlakyProxy(harness.base_url, drop=None) as proxy:
        result = harness.materialize(
            resources=["notes"], raise_on_error=False, resource_overrides=crm_api(proxy.url)
        )
        assert proxy.accepted == proxy.dropped == 4
    assert "could not connect to the CRM API for notes, also after every retry" in failure_of(
        result
    )
    assert sandbox.request_log() == []


# --- clear errors -------------------------------------------------------------------------------


def _failed_request(exc_type: type[requests.RequestException]) -> requests.RequestException:
    url = f"http://127.0.0.1:1/v1/calls?api_key={CANARY_KEY}&offset=300&limit=100"
    request = requests.Request("GET", url).prepare()
    # requests puts the URL, key included, into these messages.
    return exc_type(f"HTTPConnectionPool: Max retries exceeded with url: {url}", request=request)


@pytest.mark.parametrize(
    ("exc_type", "expected"),
    [
        (requests.ReadTimeout, "did not answer calls at offset 300 within the request timeout"),
        (requests.ConnectTimeout, "did not answer calls at offset 300 within the request timeout"),
        (requests.ConnectionError, "could not connect to the CRM API for calls"),
        (requests.exceptions.ChunkedEncodingError, "broke off its answer for calls at offset 300"),
    ],
)
def test_failure_descriptions_use_no_exception_message(
    exc_type: type[requests.RequestException], expected: str
) -> None:
    # Wrapped the way dlt wraps extraction errors: the cause sits in the chain.
    try:
        try:
            raise _failed_request(exc_type)
        except requests.RequestException as inner:
            raise RuntimeError("extraction of resource calls failed") from inner
    except RuntimeError as outer:
        description = describe_failure(outer)
    assert description is not None and expected in description
    assert CANARY_KEY not in description and "api_key" not in description


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (401, "CRM rejected the API key (401) for notes"),
        (403, "CRM rejected the API key (403) for notes"),
        (404, "CRM API answered 404 for notes at offset 0 (not retried: a client error)"),
    ],
)
def test_client_errors_fail_at_once_without_retries(
    harness: Harness,
    sandbox: SandboxClient,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    expected: str,
) -> None:
    if status == 401:
        # A real wrong key: the sandbox answers 401 by itself.
        monkeypatch.setenv("CRM_API_KEY", f"revoked-{CANARY_KEY}")
    else:
        sandbox.add_fault(resource="notes", status=status, count=10)
    result = harness.materialize(
        resources=["notes"], raise_on_error=False, resource_overrides=crm_api(harness.base_url)
    )
    failure = failure_of(result)
    assert f"CRM sync of notes failed: {expected}." in failure
    assert CANARY_KEY not in failure  # the revoked key contains it
    assert [e["status"] for e in sandbox.request_log("notes")] == [status]


def test_probe_requests_time_out_and_retry_too(sandbox: SandboxClient, harness: Harness) -> None:
    """The sensors' and checks' one-page probe has the same timeout and retries as a sync."""
    sandbox.add_fault(resource="calls", hang_seconds=3, count=10)
    probe = CrmApiResource(
        base_url=harness.base_url,
        api_key=CANARY_KEY,
        request_timeout_seconds=0.3,
        backoff_factor=0.01,
    )
    with pytest.raises(Exception, match="probing the CRM API for calls failed") as error:
        probe.count_changed(get_resource("calls"), None)
    assert "ReadTimeout" in str(error.value)
    assert [e["fault"] for e in sandbox.request_log("calls")] == ["hang_seconds=3"] * 4


def test_missing_api_key_fails_at_run_start_naming_the_variable(
    harness: Harness, sandbox: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CRM_API_KEY")
    defs = harness.definitions()  # definitions load without the key
    assert defs.resolve_job_def("crm_incremental_job") is not None
    with pytest.raises(dg.DagsterInvalidConfigError) as error:
        harness.materialize(resources=["notes"], raise_on_error=False)
    # Dagster's EnvVar, before the run starts: names the variable, says it is not set.
    assert 'the environment variable "CRM_API_KEY" which is not set' in str(error.value)
    assert "root:resources:crm_api:config:api_key" in str(error.value)

    monkeypatch.setenv("CRM_API_KEY", "  ")
    result = harness.materialize(resources=["notes"], raise_on_error=False)
    assert "CRM_API_KEY is empty: set the CRM API key in the CRM_API_KEY environment" in (
        failure_of(result)
    )
    assert sandbox.request_log() == []


def test_missing_api_key_in_the_cli(
    isolated_env: Path, sandbox: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dagster job execute`` without CRM_API_KEY: no run, a message naming the variable."""
    monkeypatch.delenv("CRM_API_KEY")
    home = isolated_env / "dagster_home"
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    cli = Path(sys.executable).with_name("dagster")
    done = subprocess.run(
        [str(cli), "job", "execute", "-m", "crm_assets.definitions", "-j", "crm_incremental_job"],
        capture_output=True,
        text=True,
        env={**os.environ, "RUNTIME__DLTHUB_TELEMETRY": "false"},
        timeout=120,
    )
    assert done.returncode != 0
    # The error the CLI ends with (the traceback above it is Dagster's, before any run).
    final_error = done.stderr[done.stderr.rindex("DagsterInvalidConfigError") :]
    assert "root:resources:crm_api:config:api_key" in final_error
    assert (
        'You have attempted to fetch the environment variable "CRM_API_KEY" which is not set'
        in final_error
    )
    assert sandbox.request_log() == []
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_runs() == []  # refused before a run was created


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://api.crm.example", True),
        ("http://127.0.0.1:8765", True),
        ("http://localhost:8765", True),
        ("http://[::1]:8765", True),
        ("http://crm.example", False),
        ("http://10.1.2.3", False),
        ("http://0.0.0.0:8765", False),
        ("ftp://crm.example", False),
        ("api.crm.example", False),
    ],
)
def test_base_url_rule(url: str, allowed: bool) -> None:
    if allowed:
        check_base_url(url)
    else:
        with pytest.raises(CrmConfigurationError):
            check_base_url(url)


def test_plain_http_to_another_host_never_sends_the_key(
    harness: Harness, sandbox: SandboxClient
) -> None:
    # 0.0.0.0 is not a loopback address, but a connection to it would reach this machine: if the
    # rule failed, the sandbox's request log would show the request (and the key).
    port = harness.base_url.rsplit(":", 1)[1]
    result = harness.materialize(
        resources=["notes"],
        raise_on_error=False,
        resource_overrides=crm_api(f"http://0.0.0.0:{port}"),
    )
    assert "CRM_BASE_URL uses plain http to 0.0.0.0: the API key would travel unencrypted" in (
        failure_of(result)
    )
    assert sandbox.request_log() == []


# --- bad pages, bad records, new fields ----------------------------------------------------------

MALFORMED_PAGES = {
    "missing_data": "the page has no 'data' field",
    "data_not_list": "'data' is a dict, not a list",
    "error_key": "the page carries an 'error' field",
    "not_json": "the body is not JSON",
    "truncated": "the body is not JSON",
    "missing_total": "the page has no 'total' field",
}


def _personal_values(records: list[dict[str, Any]]) -> set[str]:
    # Text values long enough to be unmistakable (names, bodies, websites), not enum values.
    return {v for r in records for k, v in r.items() if isinstance(v, str) and len(v) >= 12}


def test_malformed_pages_fail_naming_resource_and_offset_and_keep_the_table(
    harness: Harness, sandbox: SandboxClient
) -> None:
    assert harness.materialize("full_refresh", resources=["calls"]).success
    before = warehouse_state(harness, "calls")
    sandbox.update("calls", count=20)
    sandbox.delete("calls", count=3)
    page = sandbox.records("calls")[200:300]
    personal = _personal_values(page)
    assert personal
    sandbox.reset_log()
    for kind, problem in MALFORMED_PAGES.items():
        sandbox.add_fault(resource="calls", offset=200, malformed=kind)
        result = harness.materialize(
            "full_refresh",
            resources=["calls"],
            raise_on_error=False,
            resource_overrides=crm_api(harness.base_url),
        )
        failure = failure_of(result)
        assert (
            f"CRM API returned an invalid page for calls at offset 200: {problem}. Nothing "
            "from this run was loaded; the warehouse is unchanged." in failure
        ), kind
        logged = "\n".join(log_messages(harness, result.run_id))
        assert not [v for v in personal if v in failure or v in logged], kind
        assert warehouse_state(harness, "calls") == before, kind
        # Not retried: a malformed 200 is an answer, not a transient failure.
        assert len(requests_at(sandbox, "calls")[200]) == 1, kind
        sandbox.reset_log()


def test_invalid_records_are_quarantined_and_the_rest_loads(
    harness: Harness, sandbox: SandboxClient
) -> None:
    records = sandbox.records("notes")  # the order pages are cut from
    # The sandbox damages the middle record of the page.
    pages = [records[offset : offset + 100] for offset in (0, 100, 200)]
    no_id, bad_value, no_cursor = (page[len(page) // 2]["id"] for page in pages)
    sandbox.add_faults(
        [
            {"resource": "notes", "offset": 0, "malformed": "record_without_id"},
            {"resource": "notes", "offset": 100, "malformed": "record_bad_value"},
            {"resource": "notes", "offset": 200, "malformed": "record_without_cursor"},
        ]
    )
    result = harness.materialize(resources=["notes"], resource_overrides=crm_api(harness.base_url))
    assert result.success
    expected = api_state(sandbox, "notes")
    for record_id in (no_id, bad_value, no_cursor):
        del expected[record_id]
    assert warehouse_state(harness, "notes") == expected  # 247 rows: every other record
    metadata = metadata_of(result, "notes")
    assert metadata["rejected_records"] == 3
    rejected = harness.query(
        f"SELECT resource, record_id, reason FROM crm.{REJECTED_TABLE} ORDER BY reason"
    )
    assert rejected == [
        ("notes", bad_value, "created_at: expected timestamp, got str"),
        ("notes", None, "id: null in a NOT NULL column"),
        ("notes", no_cursor, "updated_at: null in a NOT NULL column"),
    ]
    warnings = [m for m in log_messages(harness, result.run_id) if REJECTED_TABLE in m]
    assert len(warnings) == 3


def test_new_api_fields_become_new_columns(harness: Harness, sandbox: SandboxClient) -> None:
    sandbox.add_fault(resource="deals", offset=100, extra_field="lead_source")
    result = harness.materialize(resources=["deals"], resource_overrides=crm_api(harness.base_url))
    assert result.success
    assert_equals_api(harness, sandbox, "deals")
    assert harness.query(
        "SELECT lead_source, COUNT(*) FROM crm.deals GROUP BY 1 ORDER BY 1 NULLS LAST"
    ) == [(EXTRA_FIELD_VALUE, 100), (None, DEFAULT_RECORDS["deals"] - 100)]


def test_new_api_fields_are_reported(harness: Harness, sandbox: SandboxClient) -> None:
    sandbox.add_fault(resource="deals", offset=100, extra_field="lead_source")
    result = harness.materialize(resources=["deals"], resource_overrides=crm_api(harness.base_url))
    assert result.success
    assert metadata_of(result, "deals")["new_columns"] == "lead_source"
    assert any(
        "deals: the API sent fields the contract does not list" in m and "lead_source" in m
        for m in log_messages(harness, result.run_id)
    )


# --- pagination that would never end or would lose records ---------------------------------------


def test_an_api_that_ignores_offset_is_stopped(harness: Harness, sandbox: SandboxClient) -> None:
    sandbox.add_fault(resource="notes", pagination="ignore_offset", count=1000)
    result = harness.materialize(
        resources=["notes"], raise_on_error=False, resource_overrides=crm_api(harness.base_url)
    )
    assert "CRM API returned the same page of notes twice (offset 100)" in failure_of(result)
    assert [e["offset"] for e in sandbox.request_log("notes")] == [0, 100]


def test_an_api_that_never_ends_is_stopped_by_the_page_budget(
    harness: Harness, sandbox: SandboxClient
) -> None:
    # accounts: 120 records that the API serves round and round, always promising more.
    sandbox.add_fault(resource="accounts", pagination="endless", count=1000)
    result = harness.materialize(
        resources=["accounts"], raise_on_error=False, resource_overrides=crm_api(harness.base_url)
    )
    assert "served 15 pages (up to offset 1400) but only 120 distinct records" in (
        failure_of(result)
    )
    assert len(sandbox.request_log("accounts")) == 2 * 2 + 10 + 1


def test_a_total_lower_than_the_records_loses_nothing(
    harness: Harness, sandbox: SandboxClient
) -> None:
    sandbox.add_fault(resource="calls", total=150, count=1000)
    result = harness.materialize(resources=["calls"], resource_overrides=crm_api(harness.base_url))
    assert result.success
    assert_equals_api(harness, sandbox, "calls")  # all 301, not the 150 the total claims
    assert [e["offset"] for e in sandbox.request_log("calls")] == [0, 100, 200, 300]
    assert any(
        "calls: the page at offset 100 holds records beyond the API's total (150)" in m
        for m in log_messages(harness, result.run_id)
    )


def test_a_total_higher_than_the_records_fails_after_rereading(
    harness: Harness, sandbox: SandboxClient
) -> None:
    sandbox.add_fault(resource="accounts", total=1000, count=1000)
    result = harness.materialize(
        resources=["accounts"], raise_on_error=False, resource_overrides=crm_api(harness.base_url)
    )
    assert (
        "accounts: read 120 unique records of the API's total 1000 after 3 passes (the API's "
        "pages ended at offset 200 although its total says 1000" in failure_of(result)
    )
    assert [e["offset"] for e in sandbox.request_log("accounts")] == [0, 100, 200] * 3
