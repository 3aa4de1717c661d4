"""Incremental and full refresh against the sandbox: nothing lost, nothing duplicated.

Every test runs once per warehouse backend (``WAREHOUSE_BACKENDS``): DuckDB, and PostgreSQL when
``CRM_TEST_POSTGRES_DSN`` is set (see ``conftest``). Warehouse values are compared in Python, so
the SQL stays what both backends understand.

Environment variables: ``CRM_TEST_POSTGRES_DSN``, ``CRM_TEST_REQUIRE_ALL`` (through conftest).
"""

import datetime as dt
import math
import shutil

import pytest

from crm_assets.contract import RESOURCE_NAMES
from crm_assets.resources import CrmApiResource
from crm_assets.sandbox import SandboxClient
from crm_assets_tests.conftest import CANARY_KEY, DEFAULT_RECORDS, WAREHOUSE_BACKENDS, Harness

pytestmark = pytest.mark.parametrize("warehouse_backend", WAREHOUSE_BACKENDS, indirect=True)


def api_ids(sandbox: SandboxClient, resource: str) -> list[str]:
    return sorted(r["id"] for r in sandbox.records(resource))


def api_timestamp(value: dt.datetime) -> str:
    """A warehouse timestamp (timezone-aware on every backend) in the API's UTC format."""
    assert value.tzinfo is not None, "updated_at must be stored with its time zone"
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def assert_warehouse_equals_api(harness: Harness, sandbox: SandboxClient, resource: str) -> None:
    ids = harness.table_ids(resource)
    assert len(ids) == len(set(ids)), f"duplicates in {resource}"
    assert ids == api_ids(sandbox, resource)
    api = {r["id"]: r["updated_at"] for r in sandbox.records(resource)}
    stored = {
        record_id: api_timestamp(updated_at)
        for record_id, updated_at in harness.query(f"SELECT id, updated_at FROM crm.{resource}")
    }
    assert stored == api, f"stale versions in {resource}"


def fast_retries(base_url: str, **overrides: object) -> dict[str, CrmApiResource]:
    """The crm_api resource with retry waits shrunk so failing tests stay fast."""
    fields: dict[str, object] = {
        "base_url": base_url,
        "api_key": CANARY_KEY,
        "backoff_factor": 0.01,
        "max_retry_delay_seconds": 0.05,
    }
    fields.update(overrides)
    return {"crm_api": CrmApiResource(**fields)}  # type: ignore[arg-type]


def materialized_metadata(result: object, resource: str) -> dict[str, object]:
    for event in result.get_asset_materialization_events():  # type: ignore[attr-defined]
        if event.asset_key.path[-1] == resource:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    raise AssertionError(f"no materialization of {resource}")


def test_incremental_after_updates_inserts_and_ties(
    harness: Harness, sandbox: SandboxClient
) -> None:
    assert harness.materialize("full_refresh").success
    changed: dict[str, int] = {}
    for name in RESOURCE_NAMES:
        updated = sandbox.update(name, fraction=0.02)
        added = sandbox.add(name, count=3)
        tied = sandbox.add(name, count=2, tie_with_max=True)  # same updated_at as the newest
        changed[name] = len(set(updated) | set(added) | set(tied))
    sandbox.reset_log()

    result = harness.materialize("incremental")
    assert result.success
    for name in RESOURCE_NAMES:
        assert_warehouse_equals_api(harness, sandbox, name)
        log = sandbox.request_log(name)
        assert all(entry["updated_since"] for entry in log), "incremental must send the cursor"
        # Only the changed records' pages are read (records at the old cursor are re-read too).
        assert len(log) <= math.ceil((changed[name] + 3) / 100)
        metadata = materialized_metadata(result, name)
        assert metadata["sync_mode"] == "incremental"
        assert metadata["cursor_after"] > metadata["cursor_before"]


def test_incremental_with_nothing_new_succeeds_with_zero_rows(harness: Harness) -> None:
    assert harness.materialize("full_refresh").success
    result = harness.materialize("incremental")
    assert result.success
    for name in RESOURCE_NAMES:
        metadata = materialized_metadata(result, name)
        assert metadata["rows_loaded"] == 0
        assert metadata["dagster/row_count"] == DEFAULT_RECORDS[name]
        assert metadata["cursor_after"] == metadata["cursor_before"]


def test_hard_deletes_stay_after_incremental_and_go_after_full_refresh(
    harness: Harness, sandbox: SandboxClient
) -> None:
    assert harness.materialize("full_refresh").success
    deleted = sandbox.delete("deals", count=5)
    assert harness.materialize("incremental", resources=["deals"]).success
    assert set(deleted) <= set(harness.table_ids("deals"))

    result = harness.materialize("full_refresh", resources=["deals"])
    assert result.success
    assert not set(deleted) & set(harness.table_ids("deals"))
    assert_warehouse_equals_api(harness, sandbox, "deals")
    metadata = materialized_metadata(result, "deals")
    assert metadata["cursor_after"] == max(r["updated_at"] for r in sandbox.records("deals"))


def test_cursor_lives_in_the_warehouse(harness: Harness, sandbox: SandboxClient) -> None:
    assert harness.materialize("incremental").success
    # A fresh container: no local dlt state anywhere.
    for path in (harness.tmp_path / "pipelines", harness.tmp_path / "dlt"):
        shutil.rmtree(path, ignore_errors=True)
    updated = sandbox.update("notes", count=4)
    sandbox.reset_log()
    assert harness.materialize("incremental", resources=["notes"]).success
    log = sandbox.request_log("notes")
    assert len(log) == 1 and log[0]["updated_since"]
    assert set(updated) <= set(harness.table_ids("notes"))
    assert_warehouse_equals_api(harness, sandbox, "notes")


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 503, "count": 10},  # an outage that outlasts the retries
        {"malformed": "missing_data"},  # dlt alone would stop paginating and "succeed"
    ],
    ids=["outage", "malformed-page"],
)
def test_failed_full_refresh_keeps_the_previous_table(
    harness: Harness, sandbox: SandboxClient, fault: dict[str, object]
) -> None:
    assert harness.materialize("full_refresh").success
    before = harness.table_ids("calls")
    deleted = sandbox.delete("calls", count=3)
    sandbox.update("calls", count=3)
    sandbox.add_fault(resource="calls", offset=200, **fault)

    result = harness.materialize(
        "full_refresh",
        resources=["calls"],
        raise_on_error=False,
        resource_overrides=fast_retries(harness.base_url),
    )
    assert not result.success
    assert harness.table_ids("calls") == before  # nothing of the failed run is visible

    sandbox.clear_faults()
    assert harness.materialize("incremental", resources=["calls"]).success
    assert set(deleted) <= set(harness.table_ids("calls"))  # incremental can't see deletes
    assert harness.materialize("full_refresh", resources=["calls"]).success
    assert_warehouse_equals_api(harness, sandbox, "calls")


@pytest.mark.parametrize("mode", ["full_refresh", "incremental"])
def test_records_moving_during_pagination_are_not_lost(
    harness: Harness, sandbox: SandboxClient, mode: str
) -> None:
    first_page = [r["id"] for r in sandbox.records("notes")][:3]
    if mode == "incremental":
        assert harness.materialize("full_refresh", resources=["notes"]).success
        # Two pages of changes for the incremental run; they tie on updated_at, ordered by id.
        first_page = sorted(sandbox.update("notes", count=150))[:3]
    # Before the 2nd page is served, records of the 1st page are updated: they move to the end
    # and every later record slides left, so one record per move crosses the page boundary.
    sandbox.schedule("notes", before_request=2, action="update", ids=first_page)
    sandbox.reset_log()

    result = harness.materialize(mode, resources=["notes"])  # type: ignore[arg-type]
    assert result.success
    assert_warehouse_equals_api(harness, sandbox, "notes")
    assert materialized_metadata(result, "notes")["read_passes"] >= 2
