"""What a data engineer sees after a sync: materialization metadata, asset checks, progress lines.

Real parts only: the sandbox CRM over HTTP, the warehouse (DuckDB in ``tmp_path``; PostgreSQL too
for the tampering test when ``CRM_TEST_POSTGRES_DSN`` is set), the real Dagster definitions with
their checks, and ``dagster job execute`` in a child process. A warehouse is "broken" by running
SQL on it directly, as someone with write access could.

Environment variables: ``CRM_TEST_POSTGRES_DSN``, ``CRM_TEST_REQUIRE_ALL`` (through conftest).
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import psycopg2
import pytest

from crm_assets.checks import (
    CHECK_FRESHNESS,
    CHECK_NOT_NULL,
    CHECK_PRIMARY_KEY,
    CHECK_REJECTED,
    CHECK_ROW_COUNT,
    FRESHNESS_SENSOR,
    TableProfile,
    decide_not_null,
    decide_primary_key,
    decide_rejected,
    decide_row_count,
)
from crm_assets.contract import RESOURCE_NAMES, get_resource
from crm_assets.jobs import run_config_for
from crm_assets.pagination import CrmOffsetPaginator, ResourceSyncStats, format_duration
from crm_assets.resources import CrmApiResource
from crm_assets.sandbox import SandboxClient, SandboxServer
from crm_assets.settings import settings_from_env
from crm_assets.source import SyncMode
from crm_assets_tests.conftest import CANARY_KEY, DEFAULT_RECORDS, WAREHOUSE_BACKENDS, Harness

ALL_CHECKS = (CHECK_PRIMARY_KEY, CHECK_NOT_NULL, CHECK_ROW_COUNT, CHECK_REJECTED, CHECK_FRESHNESS)
ERROR = dg.AssetCheckSeverity.ERROR
WARN = dg.AssetCheckSeverity.WARN
CHECK_EVALUATION = dg.DagsterEventType.ASSET_CHECK_EVALUATION
Evaluations = dict[tuple[str, str], dg.AssetCheckEvaluation]


# --- helpers -------------------------------------------------------------------------------------


def keys(resources: Iterable[str]) -> list[dg.AssetKey]:
    return [dg.AssetKey(["crm", name]) for name in resources]


def sync_with_checks(
    harness: Harness,
    mode: SyncMode,
    resources: Sequence[str] = RESOURCE_NAMES,
    crm_api: CrmApiResource | None = None,
) -> dg.ExecuteInProcessResult:
    """Materializes ``resources`` with their checks, as the UI's "Materialize" does."""
    defs = harness.definitions()
    resource_defs = dict(defs.resources or {})
    if crm_api is not None:
        resource_defs["crm_api"] = crm_api
    result = dg.materialize(
        [*(defs.assets or []), *(defs.asset_checks or [])],
        selection=keys(resources),
        resources=resource_defs,
        run_config=run_config_for(mode),
        instance=harness.instance,
    )
    assert result.success
    return result


def run_checks(
    harness: Harness, resources: Sequence[str], **settings: Any
) -> dg.ExecuteInProcessResult:
    """Runs only the checks of ``resources`` (the UI's "Execute checks"); nothing is synced."""
    defs = harness.definitions(**settings)
    result = dg.materialize(
        [*(defs.assets or []), *(defs.asset_checks or [])],
        selection=dg.AssetSelection.checks_for_assets(*keys(resources)),
        resources=dict(defs.resources or {}),
        instance=harness.instance,
    )
    # Failed checks do not fail the run (no check is blocking): the run reports, it does not stop.
    assert result.success
    assert result.get_asset_materialization_events() == []
    return result


def evaluations(result: dg.ExecuteInProcessResult) -> Evaluations:
    return {(e.asset_key.path[-1], e.check_name): e for e in result.get_asset_check_evaluations()}


def metadata_of(result: dg.ExecuteInProcessResult, resource: str) -> Mapping[str, Any]:
    (event,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == resource
    ]
    return event.materialization.metadata


def value(evaluation: dg.AssetCheckEvaluation, key: str) -> Any:
    return evaluation.metadata[key].value


def assert_all_passed(found: Evaluations, resources: Iterable[str]) -> None:
    assert set(found) == {(name, check) for name in resources for check in ALL_CHECKS}
    failed = {k: e.description for k, e in found.items() if not e.passed}
    assert not failed, failed


def tamper(harness: Harness, statements: Sequence[str]) -> None:
    """Changes the warehouse behind dlt's back, committed, on either backend."""
    if harness.backend == "postgres":
        connection = psycopg2.connect(harness.postgres_dsn, connect_timeout=10)
        try:
            with connection, connection.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
        finally:
            connection.close()
        return
    with duckdb.connect(str(harness.duckdb_path)) as con:
        for statement in statements:
            con.execute(statement)


def fast_retries(harness: Harness) -> CrmApiResource:
    """``crm_api`` with retry waits shrunk, so a retried request costs milliseconds."""
    return CrmApiResource(
        base_url=harness.base_url,
        api_key=CANARY_KEY,
        backoff_factor=0.01,
        max_retry_delay_seconds=0.05,
    )


# --- materialization metadata --------------------------------------------------------------------


def test_metadata_and_checks_after_full_refresh_then_incremental_job(
    harness: Harness, sandbox: SandboxClient
) -> None:
    full = sync_with_checks(harness, "full_refresh")
    newest = sandbox.max_updated_at()
    for name in RESOURCE_NAMES:
        metadata = metadata_of(full, name)
        records, pages = DEFAULT_RECORDS[name], math.ceil(DEFAULT_RECORDS[name] / 100)
        expected_ints = {
            "rows_loaded": records,
            "records_read": records,
            "api_total": records,
            "dagster/row_count": records,
            "pages": pages,
            "http_requests": pages,
            "retries": 0,
            "read_passes": 1,
            "rejected_records": 0,
        }
        for key, expected in expected_ints.items():
            # Int metadata, so the UI plots it across materializations.
            assert isinstance(metadata[key], dg.IntMetadataValue), (name, key)
            assert metadata[key].value == expected, (name, key)
        assert isinstance(metadata["duration_s"], dg.FloatMetadataValue)
        assert metadata["duration_s"].value > 0
        assert metadata["sync_mode"].value == "full_refresh"
        assert metadata["sync_mode_reason"].value == "full refresh requested"
        assert metadata["trigger"].value == "ui"
        assert isinstance(metadata["cursor_before"], dg.NullMetadataValue)
        assert metadata["cursor_after"].value == newest[name]
        assert metadata["new_columns"].value == ""
        columns = [c.name for c in metadata["dagster/column_schema"].value.columns]
        assert [c.name for c in get_resource(name).columns] == columns[: len(columns) - 2]
        # Temporary file paths of dlt's deleted working directory are noise: dropped.
        assert not {"jobs", "started_at", "dagster/table_name"} & set(metadata)
        # The load id names exactly the rows this run wrote.
        load_id = metadata["load_id"].value
        loaded = harness.query(f"SELECT COUNT(*) FROM crm.{name} WHERE _dlt_load_id = '{load_id}'")
        assert loaded[0][0] == records
    assert_all_passed(evaluations(full), RESOURCE_NAMES)

    # The incremental job (its checks included) with nothing new in the CRM.
    job = harness.definitions().resolve_job_def("crm_incremental_job")
    previous_load_ids = {
        r[0] for r in harness.query(f"SELECT load_id FROM {harness.dataset}._dlt_loads")
    }
    again = job.execute_in_process(instance=harness.instance)
    assert again.success
    for name in RESOURCE_NAMES:
        metadata = metadata_of(again, name)
        assert isinstance(metadata["rows_loaded"], dg.IntMetadataValue)
        assert metadata["rows_loaded"].value == 0
        assert metadata["dagster/row_count"].value == DEFAULT_RECORDS[name]
        assert metadata["sync_mode"].value == "incremental"
        assert metadata["cursor_before"].value == metadata["cursor_after"].value == newest[name]
        # No row of this table was written: either dlt had nothing to load (no load id) or it
        # committed a state-only load (dlt rewrites its state when the boundary hashes it keeps
        # come back in another order from the parallel extraction); never the previous run's id.
        load_id = metadata["load_id"]
        if not isinstance(load_id, dg.NullMetadataValue):
            assert load_id.value not in previous_load_ids
            assert harness.query(
                f"SELECT COUNT(*) FROM {harness.dataset}.{name} "
                f"WHERE _dlt_load_id = '{load_id.value}'"
            ) == [(0,)]
        # The API's total for the request: the records at the cursor, read again and dropped.
        assert metadata["api_total"].value == metadata["records_read"].value >= 1
    found = evaluations(again)
    assert_all_passed(found, RESOURCE_NAMES)
    row_count = found[("deals", CHECK_ROW_COUNT)]
    assert value(row_count, "sync_mode") == "incremental"
    assert value(row_count, "api_total") == value(row_count, "warehouse_rows")


def test_one_asset_incremental_with_a_retry(harness: Harness, sandbox: SandboxClient) -> None:
    sync_with_checks(harness, "full_refresh", ["deals"])
    sandbox.add("deals", count=3)
    sandbox.add_fault(resource="deals", status=503)  # the next request fails once, then retried

    result = sync_with_checks(harness, "incremental", ["deals"], crm_api=fast_retries(harness))
    metadata = metadata_of(result, "deals")
    assert metadata["rows_loaded"].value == 3
    assert metadata["retries"].value == 1
    assert metadata["http_requests"].value == metadata["pages"].value + 1
    assert metadata["cursor_after"].value > metadata["cursor_before"].value
    load_id = metadata["load_id"].value
    assert harness.query(f"SELECT COUNT(*) FROM crm.deals WHERE _dlt_load_id = '{load_id}'") == [
        (3,)
    ]
    # Only the selected asset's checks ran.
    assert_all_passed(evaluations(result), ["deals"])


# --- the checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("warehouse_backend", WAREHOUSE_BACKENDS, indirect=True)
def test_a_damaged_table_fails_the_error_checks(harness: Harness) -> None:
    sync_with_checks(harness, "full_refresh", ["deals"])
    first_id, second_id = (
        r[0] for r in harness.query("SELECT id FROM crm.deals ORDER BY id LIMIT 2")
    )
    tamper(
        harness,
        [
            # A copied row would clash with dlt's unique _dlt_id on PostgreSQL: re-key one.
            f"UPDATE crm.deals SET id = '{first_id}' WHERE id = '{second_id}'",
            "DELETE FROM crm.deals WHERE id IN (SELECT id FROM crm.deals ORDER BY id DESC LIMIT 5)",
            "ALTER TABLE crm.deals ALTER COLUMN stage DROP NOT NULL",
            "UPDATE crm.deals SET stage = NULL "
            "WHERE id IN (SELECT id FROM crm.deals ORDER BY id DESC LIMIT 2)",
        ],
    )

    found = evaluations(run_checks(harness, ["deals"]))
    primary_key = found[("deals", CHECK_PRIMARY_KEY)]
    assert (primary_key.passed, primary_key.severity) == (False, ERROR)
    assert value(primary_key, "duplicate_rows") == 1
    assert value(primary_key, "duplicate_ids") == first_id
    not_null = found[("deals", CHECK_NOT_NULL)]
    assert (not_null.passed, not_null.severity) == (False, ERROR)
    assert "stage: 2 null(s)" in (not_null.description or "")
    assert value(not_null, "null_counts")["stage"] == 2
    row_count = found[("deals", CHECK_ROW_COUNT)]
    assert (row_count.passed, row_count.severity) == (False, ERROR)
    assert value(row_count, "warehouse_rows") == DEFAULT_RECORDS["deals"] - 5
    assert (row_count.description or "").startswith("5 record(s) of the API are missing")
    assert found[("deals", CHECK_REJECTED)].passed
    assert found[("deals", CHECK_FRESHNESS)].passed


def test_row_count_after_incremental_tolerates_new_and_deleted_records_not_lost_ones(
    harness: Harness, sandbox: SandboxClient
) -> None:
    sync_with_checks(harness, "full_refresh", ["deals"])
    sync_with_checks(harness, "incremental", ["deals"])  # the last sync is now incremental
    rows = DEFAULT_RECORDS["deals"]

    # Created since the run: the API is ahead, legitimately (the next run reads them).
    sandbox.add("deals", count=3)
    check = evaluations(run_checks(harness, ["deals"]))[("deals", CHECK_ROW_COUNT)]
    assert check.passed, check.description
    assert (value(check, "api_total"), value(check, "warehouse_rows")) == (rows + 3, rows)
    assert value(check, "api_changed_since_cursor") >= 3

    # Hard deletes: the warehouse is ahead until the next full refresh; not an error.
    sandbox.delete("deals", count=10)
    check = evaluations(run_checks(harness, ["deals"]))[("deals", CHECK_ROW_COUNT)]
    assert check.passed, check.description
    assert value(check, "extra_rows") == rows - (rows + 3 - 10)

    # Rows lost from the warehouse beyond what the API explains: an error.
    tamper(harness, ["DELETE FROM crm.deals WHERE id IN (SELECT id FROM crm.deals LIMIT 50)"])
    check = evaluations(run_checks(harness, ["deals"]))[("deals", CHECK_ROW_COUNT)]
    assert (check.passed, check.severity) == (False, ERROR)
    missing = value(check, "api_total") - value(check, "warehouse_rows")
    assert missing > value(check, "api_changed_since_cursor") + value(check, "quarantined_missing")


def test_rejected_records_warn_and_are_not_counted_as_lost(
    harness: Harness, sandbox: SandboxClient
) -> None:
    sandbox.add_fault(resource="calls", offset=100, malformed="record_bad_value")
    result = sync_with_checks(harness, "full_refresh", ["calls"])
    assert metadata_of(result, "calls")["rejected_records"].value == 1

    found = evaluations(result)
    rejected = found[("calls", CHECK_REJECTED)]
    assert (rejected.passed, rejected.severity) == (False, WARN)
    assert value(rejected, "rejected_records") == 1
    ((reason, count),) = value(rejected, "reasons").items()
    assert count == 1 and reason in (rejected.description or "")
    row_count = found[("calls", CHECK_ROW_COUNT)]
    assert row_count.passed, row_count.description  # 300 rows = 301 in the API - 1 rejected
    assert value(row_count, "warehouse_rows") == DEFAULT_RECORDS["calls"] - 1

    # The next run rejected nothing: its check passes, the quarantined id stays explained.
    found = evaluations(sync_with_checks(harness, "incremental", ["calls"]))
    assert found[("calls", CHECK_REJECTED)].passed
    assert found[("calls", CHECK_REJECTED)].severity == WARN
    row_count = found[("calls", CHECK_ROW_COUNT)]
    assert row_count.passed, row_count.description
    assert value(row_count, "quarantined_missing") == 1


def test_freshness_warns_once_the_last_sync_is_too_old(harness: Harness) -> None:
    found = evaluations(sync_with_checks(harness, "incremental", ["accounts"]))
    assert found[("accounts", CHECK_FRESHNESS)].passed

    # Any sync is older than 3.6 microseconds by the time the check runs.
    stale = evaluations(run_checks(harness, ["accounts"], freshness_max_age_hours=1e-9))
    freshness = stale[("accounts", CHECK_FRESHNESS)]
    assert (freshness.passed, freshness.severity) == (False, WARN)

    assert settings_from_env({}).freshness_max_age_hours == 6.0
    assert settings_from_env({"CRM_FRESHNESS_MAX_AGE_HOURS": "12"}).freshness_max_age_hours == 12
    with pytest.raises(ValueError, match="CRM_FRESHNESS_MAX_AGE_HOURS must be a number"):
        settings_from_env({"CRM_FRESHNESS_MAX_AGE_HOURS": "daily"})
    defs = harness.definitions(freshness_max_age_hours=12)
    sensor = defs.resolve_sensor_def(FRESHNESS_SENSOR)
    # Evaluates freshness between syncs; the only sensor on by default (it starts no sync).
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


# --- the rules, case by case ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "rows", "api_total", "rejected", "pending", "passed", "severity"),
    [
        ("full_refresh", 100, 100, 0, 0, True, ERROR),
        ("full_refresh", 99, 100, 1, 0, True, ERROR),  # the rejected record is not lost
        ("full_refresh", 98, 100, 1, 0, False, ERROR),  # one lost
        ("full_refresh", 101, 100, 0, 0, False, WARN),  # deleted while the refresh read
        ("incremental", 100, 103, 0, 3, True, ERROR),  # created since the run
        ("incremental", 100, 97, 0, 0, True, ERROR),  # hard deletes, until a full refresh
        ("incremental", 100, 102, 1, 1, True, ERROR),  # a new record and a quarantined one
        ("incremental", 95, 100, 1, 3, False, ERROR),  # one lost
    ],
)
def test_row_count_rule(
    mode: str,
    rows: int,
    api_total: int,
    rejected: int,
    pending: int,
    passed: bool,
    severity: dg.AssetCheckSeverity,
) -> None:
    verdict = decide_row_count(mode, rows, api_total, rejected, pending)
    assert (verdict.passed, verdict.severity) == (passed, severity), verdict.description


def test_table_rules() -> None:
    clean = TableProfile(True, rows=5, nulls={"id": 0, "name": 0})
    assert decide_primary_key(clean).passed and decide_not_null(clean).passed
    broken = TableProfile(
        True,
        rows=5,
        null_ids=1,
        duplicate_rows=2,
        duplicate_examples=("d-1",),
        nulls={"id": 1, "name": 3},
        missing_columns=("stage",),
    )
    assert decide_primary_key(broken).description == (
        "1 row(s) without id; 2 duplicate row(s), e.g. id d-1"
    )
    assert decide_not_null(broken).description == "stage is missing; id: 1 null(s); name: 3 null(s)"
    assert decide_rejected(0, {}).passed
    assert decide_rejected(0, {"name: null in a NOT NULL column": 2}).severity == WARN


def test_progress_line_format() -> None:
    stats = ResourceSyncStats("deals", pages=50, records_received=5000, unique_records=4990)
    stats.api_total, stats.passes = 50_000, 2
    line = CrmOffsetPaginator("deals", stats).progress_line()
    assert re.fullmatch(
        r"deals: page 50 \(re-read pass 2\), 4,990 of 50,000 records \(10%\), "
        r"[\d,]+ rec/s, ETA (\d+s|\d+m \d\ds|\d+h \d\dm)",
        line,
    ), line
    assert (format_duration(41.4), format_duration(185), format_duration(7620)) == (
        "41s",
        "3m 05s",
        "2h 07m",
    )


# --- what `dagster job execute` shows ------------------------------------------------------------

PROGRESS_RE = re.compile(
    r"(?P<resource>\w+): page (?P<page>\d+), (?P<read>[\d,]+) of (?P<total>[\d,]+) records "
    r"\(\d+%\), [\d,]+ rec/s, (?P<tail>ETA .+|done in .+)$"
)


def run_cli(command: Sequence[str], env: Mapping[str, str], timeout: float) -> str:
    """Runs ``command`` in its own process group; the whole group dies if it overruns."""
    process = subprocess.Popen(
        command,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # step workers are grandchildren: kill them with the group
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{command[1:3]} did not finish in {timeout:g} s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow  # starts `dagster job execute`
def test_job_execute_logs_progress_and_runs_every_check(isolated_env: Path) -> None:
    """`dagster job execute` of crm_full_refresh_job: progress every 2 pages, 20 checks."""
    # 950 deals: ten pages, the last one short, so the read ends on page 10.
    records = {"notes": 30, "deals": 950, "accounts": 30, "calls": 30}
    config = isolated_env / "progress.yaml"
    # Run config replaces the resource's whole config: the key and URL stay env references.
    # One process for all steps: the default multiprocess executor would start three more
    # Python processes here (the UI test runs it that way).
    config.write_text(
        "execution:\n"
        "  config:\n"
        "    in_process: {}\n"
        "resources:\n"
        "  crm_api:\n"
        "    config:\n"
        "      api_key: {env: CRM_API_KEY}\n"
        "      base_url: {env: CRM_BASE_URL}\n"
        "      progress_every_pages: 2\n"
    )
    with SandboxServer(records=records, seed=3, api_key=CANARY_KEY) as crm:
        env = {**os.environ, "CRM_BASE_URL": crm.url}
        output = run_cli(
            [
                str(Path(sys.executable).with_name("dagster")),
                *("job", "execute", "-m", "crm_assets.definitions"),
                *("-j", "crm_full_refresh_job", "-c", str(config)),
                *("--tags", json.dumps({"crm/trigger": "cli"})),
            ],
            env,
            timeout=240,
        )
    progress = [m for m in map(PROGRESS_RE.search, output.splitlines()) if m]
    # Only deals is long (10 pages); the one-page resources stay quiet.
    assert {m["resource"] for m in progress} == {"deals"}
    assert [(int(m["page"]), m["read"], m["total"]) for m in progress] == [
        (2, "200", "950"),
        (4, "400", "950"),
        (6, "600", "950"),
        (8, "800", "950"),
        (10, "950", "950"),
    ]
    assert [m["tail"].split()[0] for m in progress] == ["ETA"] * 4 + ["done"]
    assert CANARY_KEY not in output

    with dg.DagsterInstance.get() as instance:  # DAGSTER_HOME of isolated_env
        (run,) = instance.get_runs()
        assert run.job_name == "crm_full_refresh_job" and run.tags["crm/trigger"] == "cli"
        checks = [
            e.dagster_event.asset_check_evaluation_data
            for e in instance.all_logs(run.run_id, of_type=CHECK_EVALUATION)
            if e.dagster_event is not None
        ]
    assert sorted((c.asset_key.path[-1], c.check_name) for c in checks) == sorted(
        (name, check) for name in RESOURCE_NAMES for check in ALL_CHECKS
    )
    assert all(c.passed for c in checks), [c.description for c in checks if not c.passed]
