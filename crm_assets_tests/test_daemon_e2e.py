"""Production shape on one machine: ``dagster-daemon`` drives ``crm_change_sensor`` end to end.

The instance is ``deploy/dagster.yaml`` as shipped (PostgreSQL storage, the queued run coordinator
with one run per CRM resource, the ``crm_warehouse`` pool limited to 1, run retries), copied into
a temporary ``DAGSTER_HOME`` and pointed, through its own environment variables, at a fresh
PostgreSQL database; the warehouse is another fresh database (``CRM_DESTINATION=postgres``).
``dagster-daemon run`` and ``dagster-webserver -h 127.0.0.1`` load ``workspace.yaml`` as a user
would. The test turns the sensor on through the webserver's GraphQL API (the UI's toggle), sees a
tick skip while the warehouse is level, changes data in the sandbox CRM, and waits until the
daemon's tick has queued, dequeued and run an incremental sync of exactly the changed resources,
after which the warehouse equals the API. Every wait is bounded and reports the processes' logs
when it runs out; both process groups are stopped (TERM, then KILL) whatever happens.

Environment variables: ``CRM_TEST_POSTGRES_DSN`` (required; without it this test skips, or
fails when ``CRM_TEST_REQUIRE_ALL=1``), through conftest. The Dagster processes get
``DAGSTER_HOME``, ``DAGSTER_PG_HOST/PORT/USERNAME/PASSWORD/DB``, ``CRM_DESTINATION``,
``DESTINATION__POSTGRES__CREDENTIALS``, ``CRM_BASE_URL``, ``CRM_API_KEY`` and
``CRM_SENSOR_INTERVAL_SECONDS``.
"""

import datetime as dt
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import psycopg2
import pytest
import requests
import yaml

from crm_assets.contract import RESOURCE_NAMES
from crm_assets.definitions import build_definitions
from crm_assets.jobs import resource_tag, run_config_for
from crm_assets.sandbox import SandboxClient, SandboxServer
from crm_assets.settings import settings_from_env
from crm_assets_tests.conftest import (
    ManagedProcess,
    dlt_postgres_credentials,
    free_port,
    wait_for,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCATION = "crm_assets"  # workspace.yaml's location_name
SENSOR_SELECTOR = {
    "repositoryLocationName": LOCATION,
    "repositoryName": "__repository__",  # the repository of a `Definitions` object
    "sensorName": "crm_change_sensor",
}
TERMINAL_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}

# Bounds of the waits (seconds). Generous for a loaded 2-core CI machine; the happy path takes a
# fraction of each. Running out is a failure that prints the processes' logs, never a skip.
STARTUP_TIMEOUT = 120.0
TICK_TIMEOUT = 90.0
RUN_TIMEOUT = 150.0


def graphql(url: str, query: str, variables: Mapping[str, Any]) -> dict[str, Any]:
    """One GraphQL request to the webserver; fails on GraphQL errors."""
    response = requests.post(
        f"{url}/graphql", json={"query": query, "variables": dict(variables)}, timeout=30
    )
    response.raise_for_status()
    body = response.json()
    assert not body.get("errors"), body["errors"]
    return body["data"]


START_SENSOR = """
mutation Start($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { status } }
    ... on PythonError { message }
  }
}
"""

SENSOR_TICKS = """
query Ticks($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor {
      sensorState {
        status
        ticks(limit: 25) { id status runIds skipReason error { message } }
      }
    }
    ... on PythonError { message }
  }
}
"""

RUN = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status tags { key value } assetSelection { path } }
    ... on PythonError { message }
  }
}
"""


def sensor_ticks(url: str) -> list[dict[str, Any]]:
    data = graphql(url, SENSOR_TICKS, {"selector": SENSOR_SELECTOR})["sensorOrError"]
    assert data["__typename"] == "Sensor", data
    ticks = data["sensorState"]["ticks"]
    failed = [t for t in ticks if t["status"] == "FAILURE"]
    assert not failed, f"crm_change_sensor tick failed: {failed[0]['error']}"
    return ticks


def render_instance(home: Path, dequeue_interval_seconds: int) -> None:
    """``deploy/dagster.yaml`` into ``home``; only the queue's polling interval is shortened."""
    config = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    config["run_coordinator"]["config"]["dequeue_interval_seconds"] = dequeue_interval_seconds
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def warehouse_snapshot(dsn: str, resource: str) -> dict[str, str]:
    """``id -> updated_at`` (UTC, API format) of one warehouse table."""
    connection = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT id, updated_at FROM crm.{resource}")
            return {
                record_id: updated_at.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                for record_id, updated_at in cursor.fetchall()
            }
    finally:
        connection.close()


def run_report(home: Path, run_id: str) -> str:
    """The run's error events (step failures with their causes, run failure), for messages."""
    lines: list[str] = []
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for entry in instance.all_logs(run_id):
            event = entry.dagster_event
            if event is None or not (event.is_failure or event.event_type_value == "ENGINE_EVENT"):
                continue
            lines.append(f"{event.event_type_value}: {entry.message}")
            error = getattr(event.event_specific_data, "error", None)
            if error is not None:
                lines.append(error.to_string())
    return "\n".join(lines)


def test_daemon_tick_launches_a_queued_sync_that_levels_the_warehouse(
    isolated_env: Path,
    sandbox: SandboxClient,
    sandbox_server: SandboxServer,
    postgres_database_factory: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    managed_processes: list[ManagedProcess],
) -> None:
    processes = managed_processes
    storage_dsn = postgres_database_factory("dagster")
    warehouse_dsn = postgres_database_factory("warehouse")
    storage = urlsplit(storage_dsn)
    settings_env = {
        # deploy/dagster.yaml's variables, as docs/deploy.md sets them.
        "DAGSTER_PG_HOST": storage.hostname or "127.0.0.1",
        "DAGSTER_PG_PORT": str(storage.port or 5432),
        "DAGSTER_PG_USERNAME": storage.username or "postgres",
        "DAGSTER_PG_PASSWORD": storage.password or "",
        "DAGSTER_PG_DB": storage.path.lstrip("/"),
        "CRM_DESTINATION": "postgres",
        "DESTINATION__POSTGRES__CREDENTIALS": dlt_postgres_credentials(warehouse_dsn),
        "CRM_SENSOR_INTERVAL_SECONDS": "1",
    }
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)
    home = Path(os.environ["DAGSTER_HOME"])
    render_instance(home, dequeue_interval_seconds=1)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    workspace = str(REPO / "workspace.yaml")
    # Loading the instance creates Dagster's tables in the fresh database, before the daemon and
    # the webserver start (both would otherwise race to create them).
    with dg.DagsterInstance.from_config(str(home)) as instance:
        processes.append(
            ManagedProcess(
                "dagster-daemon",
                [str(BIN / "dagster-daemon"), "run", "-w", workspace],
                env,
                isolated_env / "daemon.log",
            )
        )
        processes.append(
            ManagedProcess(
                "dagster-webserver",
                [
                    str(BIN / "dagster-webserver"),
                    *("-h", "127.0.0.1", "-p", str(port), "-w", workspace),
                ],
                env,
                isolated_env / "webserver.log",
            )
        )
        # Baseline while they load their code: the warehouse level with the API, through the
        # production instance itself. The sensor is still off, so nothing else writes.
        defs = build_definitions(settings_from_env())
        baseline = dg.materialize(
            list(defs.assets or []),
            resources=dict(defs.resources or {}),
            run_config=run_config_for("full_refresh"),
            instance=instance,
        )
        assert baseline.success

    def webserver_up() -> bool | None:
        try:
            return requests.get(f"{url}/server_info", timeout=5).ok or None
        except requests.ConnectionError:
            return None

    wait_for("the webserver to answer", webserver_up, STARTUP_TIMEOUT, processes)

    started = graphql(url, START_SENSOR, {"selector": SENSOR_SELECTOR})["startSensor"]
    assert started["__typename"] == "Sensor", started
    assert started["sensorState"]["status"] == "RUNNING"

    # A tick while the warehouse is level: the sensor runs in the daemon and requests nothing.
    def level_tick() -> dict[str, Any] | None:
        return next((t for t in sensor_ticks(url) if t["status"] == "SKIPPED"), None)

    skipped = wait_for("a skipped tick", level_tick, STARTUP_TIMEOUT + TICK_TIMEOUT, processes)
    assert "no changes since" in (skipped["skipReason"] or ""), skipped
    seen = {t["id"] for t in sensor_ticks(url)}

    updated = sandbox.update("deals", count=3)
    added = sandbox.add("notes", count=2)
    changed = {"deals", "notes"}

    def launching_tick() -> dict[str, Any] | None:
        return next((t for t in sensor_ticks(url) if t["id"] not in seen and t["runIds"]), None)

    def finished(run_id: str) -> Callable[[], dict[str, Any] | None]:
        def probe() -> dict[str, Any] | None:
            run = graphql(url, RUN, {"runId": run_id})["runOrError"]
            assert run["__typename"] == "Run", run
            return run if run["status"] in TERMINAL_RUN_STATUSES else None

        return probe

    # Normally one tick requests both resources; a tick falling between the two sandbox calls
    # requests deals alone and the next one notes (the sensor skips resources in flight).
    covered: set[str] = set()
    run_ids: list[str] = []
    while covered != changed:
        assert len(run_ids) < len(changed), f"more runs than changed resources: {run_ids}"
        tick = wait_for("a tick that requests a run", launching_tick, TICK_TIMEOUT, processes)
        seen.add(tick["id"])
        for run_id in tick["runIds"]:
            run_ids.append(run_id)
            run = wait_for(f"run {run_id} to finish", finished(run_id), RUN_TIMEOUT, processes)
            assert run["status"] == "SUCCESS", run_report(home, run_id)
            selected = {a["path"][-1] for a in run["assetSelection"]}
            assert selected <= changed and not selected & covered, (selected, covered)
            covered |= selected
            tags = {t["key"]: t["value"] for t in run["tags"]}
            assert tags["crm/trigger"] == "crm_change_sensor"
            assert tags["crm/sync_mode"] == "incremental"
            assert tags["dagster/sensor_name"] == "crm_change_sensor"
            # Exactly the requested resources: their per-resource tags are what the queue limits.
            assert {k for k in tags if k.startswith("crm/resource.")} == {
                resource_tag(name) for name in selected
            }
            with dg.DagsterInstance.from_config(str(home)) as instance:
                events = [e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event]
            kinds = [event.event_type_value for event in events]
            # The run went through the queue (QueuedRunCoordinator) before the daemon launched it.
            assert "PIPELINE_ENQUEUED" in kinds and "PIPELINE_STARTING" in kinds, kinds
            assert kinds.index("PIPELINE_ENQUEUED") < kinds.index("PIPELINE_STARTING")
            # Asset checks that ran in the same run (crm_assets/checks.py) passed on PostgreSQL.
            checks = [
                e.event_specific_data
                for e in events
                if e.event_type_value == "ASSET_CHECK_EVALUATION"
            ]
            failed = [
                f"{c.asset_key.to_user_string()}:{c.check_name}" for c in checks if not c.passed
            ]
            assert not failed, failed

    # The warehouse is level with the API again, new and updated records included.
    for name in RESOURCE_NAMES:
        api = {r["id"]: r["updated_at"] for r in sandbox.records(name)}
        assert warehouse_snapshot(warehouse_dsn, name) == api, name
    notes = warehouse_snapshot(warehouse_dsn, "notes")
    deals = warehouse_snapshot(warehouse_dsn, "deals")
    assert set(added) <= set(notes) and set(updated) <= set(deals)
