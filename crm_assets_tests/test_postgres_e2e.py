"""PostgreSQL as the warehouse: what the backend-parametrized sync tests do not already cover.

``test_foundation_e2e`` and ``test_sync_modes_e2e`` run every sync scenario on DuckDB and on
PostgreSQL. This module adds what only matters on a database server: the sensors' SQL
(``count_rows_since``'s timestamp comparison, row counts, the state restore) on a database whose
time zone is not UTC, the healing of a table lost after its cursor was committed, the quarantine
table, and a warehouse outage that fails the run without putting the warehouse password into
Dagster's event log. Each test gets a PostgreSQL database of its own (created and dropped by the
``postgres_database`` fixture), loaded through ``CRM_DESTINATION=postgres`` and dlt's
``DESTINATION__POSTGRES__CREDENTIALS``, exactly as a deployment configures it.

Environment variables: ``CRM_TEST_POSTGRES_DSN`` (required; without it these tests skip, or
fail when ``CRM_TEST_REQUIRE_ALL=1``), through conftest.
"""

import datetime as dt

import dagster as dg
import psycopg2
import pytest
from dagster._core.storage.defs_state.base import set_defs_state_storage

from crm_assets.contract import RESOURCE_NAMES
from crm_assets.jobs import resource_tags, run_config_for
from crm_assets.sandbox import SandboxClient
from crm_assets_tests.conftest import DEFAULT_RECORDS, Harness

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.parametrize("warehouse_backend", ["postgres"], indirect=True),
]

# A real zone with a 45-minute offset (+12:45/+13:45): any code that drops or assumes the zone of
# a timestamp shows up as a mismatch instead of passing by luck of a UTC server.
ODD_TIME_ZONE = "Pacific/Chatham"


def execute(harness: Harness, statement: str) -> None:
    """Runs one statement without result rows (DDL, SET) on the test's PostgreSQL database."""
    connection = psycopg2.connect(harness.postgres_dsn, connect_timeout=10)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def evaluate_sensor(harness: Harness, name: str) -> dg.SensorResult | dg.SkipReason:
    """One evaluation of a sensor of the harness's definitions, as the daemon would do it."""
    # Sensor evaluation leaves Dagster's "current" defs state storage pointing at a disposed
    # instance; pin the harness's own for the duration (as test_automation_e2e does).
    with set_defs_state_storage(harness.instance.defs_state_storage):
        defs = harness.definitions()
        sensor = defs.resolve_sensor_def(name)
        with dg.build_sensor_context(
            instance=harness.instance, resources=dict(defs.resources or {}), definitions=defs
        ) as context:
            result = sensor(context)
    assert isinstance(result, dg.SensorResult | dg.SkipReason)
    return result


def requested_resources(request: dg.RunRequest) -> list[str]:
    return sorted(key.path[-1] for key in request.asset_selection or [])


def test_sensors_decide_from_a_postgres_warehouse_in_a_non_utc_zone(
    harness: Harness, sandbox: SandboxClient
) -> None:
    # Every new session of this database (dlt's, the sensors') runs in the odd zone.
    database = harness.query("SELECT current_database()")[0][0]
    execute(harness, f"ALTER DATABASE {database} SET timezone TO '{ODD_TIME_ZONE}'")
    assert harness.query("SHOW timezone") == [(ODD_TIME_ZONE,)]
    assert harness.materialize("full_refresh").success

    # Two change batches one second apart, then an incremental sync: the notes cursor sits one
    # second after three rows. A cursor compared in the session's zone instead of UTC would
    # count those rows as "at or after the cursor" and hide the next change.
    ids = [r["id"] for r in sandbox.records("notes")]
    sandbox.update("notes", ids=ids[:3])
    sandbox.update("notes", ids=ids[3:5])
    assert harness.materialize("incremental", resources=["notes"]).success

    # Level: the cursor comparison counts exactly the rows at the cursor (ties included).
    skip = evaluate_sensor(harness, "crm_change_sensor")
    assert isinstance(skip, dg.SkipReason), skip
    for name in RESOURCE_NAMES:
        assert f"{name}: no changes since" in (skip.skip_message or "")

    sandbox.add("notes", count=1)
    sandbox.update("deals", count=2)
    sandbox.add("calls", count=1, tie_with_max=True)  # a new record tied with the cursor
    result = evaluate_sensor(harness, "crm_change_sensor")
    assert isinstance(result, dg.SensorResult), result
    (request,) = result.run_requests or []
    assert requested_resources(request) == ["calls", "deals", "notes"]
    assert request.run_config == run_config_for("incremental")
    assert request.tags == {
        "crm/trigger": "crm_change_sensor",
        "crm/sync_mode": "incremental",
        **resource_tags(["calls", "deals", "notes"]),
    }
    # The requested run brings the warehouse level; the sensor is satisfied again.
    assert harness.materialize("incremental", resources=["calls", "deals", "notes"]).success
    assert isinstance(evaluate_sensor(harness, "crm_change_sensor"), dg.SkipReason)

    # Hard deletes: more rows in PostgreSQL than in the API -> a full refresh of that resource.
    assert isinstance(evaluate_sensor(harness, "crm_drift_sensor"), dg.SkipReason)
    deleted = sandbox.delete("accounts", count=2)
    drift = evaluate_sensor(harness, "crm_drift_sensor")
    assert isinstance(drift, dg.SensorResult)
    (refresh,) = drift.run_requests or []
    assert requested_resources(refresh) == ["accounts"]
    assert refresh.tags["crm/sync_mode"] == "full_refresh"
    assert refresh.tags["crm/resource.accounts"] == "true"
    assert harness.materialize("full_refresh", resources=["accounts"]).success
    assert not set(deleted) & set(harness.table_ids("accounts"))
    assert isinstance(evaluate_sensor(harness, "crm_drift_sensor"), dg.SkipReason)


def test_cursor_committed_in_postgres_but_table_lost_heals_with_a_full_refresh(
    harness: Harness, sandbox: SandboxClient
) -> None:
    assert harness.materialize("full_refresh", resources=["deals"]).success
    # A full refresh killed inside dlt's load step: table dropped, cursor (state) kept.
    execute(harness, "DROP TABLE crm.deals")
    assert harness.query("SELECT COUNT(*) FROM crm._dlt_pipeline_state")[0][0] >= 1

    result = harness.materialize("incremental", resources=["deals"])
    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["sync_mode"].value == "full_refresh"
    assert "interrupted" in str(metadata["sync_mode_reason"].value)
    assert harness.table_ids("deals") == sorted(r["id"] for r in sandbox.records("deals"))
    assert harness.count("deals") == DEFAULT_RECORDS["deals"]


def test_rejected_records_are_quarantined_in_postgres(
    harness: Harness, sandbox: SandboxClient
) -> None:
    sandbox.add_fault(resource="notes", offset=100, malformed="record_bad_value")
    result = harness.materialize("full_refresh", resources=["notes"])
    assert result.success
    (event,) = result.get_asset_materialization_events()
    assert event.materialization.metadata["rejected_records"].value == 1

    rows = harness.query(
        "SELECT resource, record_id, reason, rejected_at FROM crm._rejected_records"
    )
    assert len(rows) == 1
    resource, record_id, reason, rejected_at = rows[0]
    assert resource == "notes" and record_id and reason
    assert isinstance(rejected_at, dt.datetime) and rejected_at.tzinfo is not None
    assert harness.count("notes") == DEFAULT_RECORDS["notes"] - 1
    assert record_id not in harness.table_ids("notes")


def test_unreachable_warehouse_fails_the_run_without_leaking_its_password(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "warehouse-canary-7f3a"
    # Nothing listens on port 1 of loopback: the connection is refused at once.
    monkeypatch.setenv(
        "DESTINATION__POSTGRES__CREDENTIALS",
        f"postgresql://loader:{password}@127.0.0.1:1/analytics?connect_timeout=5",
    )
    result = harness.materialize("full_refresh", resources=["deals"], raise_on_error=False)
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "the run must fail on its step, naming the cause"
    message = failures[0].step_failure_data.error.to_string()
    assert "CRM sync of deals failed" in message
    logged = "\n".join(str(entry) for entry in harness.instance.all_logs(result.run_id))
    assert password not in logged and password not in message
