"""Schedules and sensors evaluated against the sandbox and a real DuckDB warehouse."""

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.defs_state.base import set_defs_state_storage
from dagster._core.test_utils import create_run_for_test

from crm_assets.assets import CRM_POOL
from crm_assets.contract import RESOURCE_NAMES
from crm_assets.jobs import (
    crm_full_refresh_job,
    crm_incremental_job,
    resource_tags,
    run_config_for,
)
from crm_assets.sandbox import SandboxClient
from crm_assets_tests.conftest import Harness


def evaluate_sensor(
    harness: Harness, name: str, **settings: object
) -> dg.SensorResult | dg.SkipReason:
    # Dagster resolves definitions against the "current" instance's state storage, a context
    # variable that sensor evaluation leaves pointing at a disposed instance: pin ours.
    with set_defs_state_storage(harness.instance.defs_state_storage):
        defs = harness.definitions(**settings)
        sensor = defs.get_sensor_def(name)
        with dg.build_sensor_context(
            instance=harness.instance, resources=dict(defs.resources or {}), definitions=defs
        ) as context:
            result = sensor(context)
    assert isinstance(result, dg.SensorResult | dg.SkipReason)
    return result


def keys(request: dg.RunRequest) -> list[str]:
    return sorted(k.to_user_string() for k in request.asset_selection or [])


class TestSchedules:
    @pytest.mark.parametrize(
        ("name", "mode", "cron"),
        [
            ("crm_incremental_schedule", "incremental", "0 * * * *"),
            ("crm_full_refresh_schedule", "full_refresh", "0 3 * * 0"),
        ],
    )
    def test_schedule_requests_its_mode(
        self, harness: Harness, name: str, mode: str, cron: str
    ) -> None:
        defs = harness.definitions()
        schedule = defs.get_schedule_def(name)
        assert schedule.cron_schedule == cron
        assert schedule.execution_timezone == "UTC"
        assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
        context = dg.build_schedule_context(
            instance=harness.instance,
            scheduled_execution_time=dt.datetime(2026, 1, 4, 3, tzinfo=dt.timezone.utc),
        )
        data = schedule.evaluate_tick(context)
        (request,) = data.run_requests or []
        assert request.tags["crm/sync_mode"] == mode
        assert request.tags["crm/trigger"] == "schedule"
        assert schedule.job_name == f"crm_{mode}_job"
        job = {"incremental": crm_incremental_job, "full_refresh": crm_full_refresh_job}[mode]
        assert job.config == run_config_for(mode)  # type: ignore[arg-type]

    def test_crons_are_configurable(self, harness: Harness) -> None:
        defs = harness.definitions(
            incremental_cron="*/15 * * * *", schedule_timezone="Europe/Paris"
        )
        schedule = defs.get_schedule_def("crm_incremental_schedule")
        assert (schedule.cron_schedule, schedule.execution_timezone) == (
            "*/15 * * * *",
            "Europe/Paris",
        )


class TestChangeSensor:
    def test_never_synced_requests_all(self, harness: Harness) -> None:
        result = evaluate_sensor(harness, "crm_change_sensor")
        assert isinstance(result, dg.SensorResult)
        (request,) = result.run_requests or []
        assert keys(request) == sorted(f"crm/{n}" for n in RESOURCE_NAMES)
        assert request.run_config == run_config_for("incremental")
        assert request.tags == {
            "crm/trigger": "crm_change_sensor",
            "crm/sync_mode": "incremental",
            **resource_tags(RESOURCE_NAMES),
        }
        assert request.run_key and request.run_key.startswith("crm_change_sensor:")

    def test_requests_exactly_the_changed_resources(
        self, harness: Harness, sandbox: SandboxClient
    ) -> None:
        assert harness.materialize("full_refresh").success
        skip = evaluate_sensor(harness, "crm_change_sensor")
        assert isinstance(skip, dg.SkipReason)
        assert "deals: no changes since" in (skip.skip_message or "")

        sandbox.update("deals", count=2)
        sandbox.add("calls", count=1, tie_with_max=True)  # a new record tied with the cursor
        result = evaluate_sensor(harness, "crm_change_sensor")
        assert isinstance(result, dg.SensorResult)
        (request,) = result.run_requests or []
        assert keys(request) == ["crm/calls", "crm/deals"]
        # Same state, same run key: Dagster launches it only once.
        again = evaluate_sensor(harness, "crm_change_sensor")
        assert isinstance(again, dg.SensorResult)
        assert again.run_requests[0].run_key == request.run_key  # type: ignore[index]

    def test_skips_resources_with_a_run_in_flight(
        self, harness: Harness, sandbox: SandboxClient
    ) -> None:
        assert harness.materialize("full_refresh").success
        sandbox.update("deals", count=2)
        create_run_for_test(
            harness.instance,
            job_name="__ASSET_JOB",
            status=dg.DagsterRunStatus.STARTED,
            asset_selection=frozenset({dg.AssetKey(["crm", "deals"])}),
        )
        result = evaluate_sensor(harness, "crm_change_sensor")
        assert isinstance(result, dg.SkipReason)
        # DuckDB has a single writer: while any sync runs, the sensors do not even read it.
        assert "a run syncing deals holds the DuckDB warehouse" in (result.skip_message or "")


class TestDriftSensor:
    def test_never_full_refreshed(self, harness: Harness) -> None:
        assert harness.materialize("incremental", resources=["notes"]).success
        result = evaluate_sensor(harness, "crm_drift_sensor")
        assert isinstance(result, dg.SensorResult)
        requests = {keys(r)[0]: r for r in result.run_requests or []}
        assert set(requests) == {f"crm/{n}" for n in RESOURCE_NAMES}
        notes = requests["crm/notes"]
        assert notes.run_config == run_config_for("full_refresh")
        assert notes.tags == {
            "crm/trigger": "crm_drift_sensor",
            "crm/sync_mode": "full_refresh",
            "crm/resource.notes": "true",
        }

    def test_hard_delete_requests_a_full_refresh_of_that_resource(
        self, harness: Harness, sandbox: SandboxClient
    ) -> None:
        assert harness.materialize("full_refresh").success
        skip = evaluate_sensor(harness, "crm_drift_sensor")
        assert isinstance(skip, dg.SkipReason)
        assert "accounts: warehouse equals the API" in (skip.skip_message or "")

        sandbox.delete("accounts", count=2)
        result = evaluate_sensor(harness, "crm_drift_sensor")
        assert isinstance(result, dg.SensorResult)
        (request,) = result.run_requests or []
        assert keys(request) == ["crm/accounts"]
        assert request.run_config == run_config_for("full_refresh")

        # The requested run reconciles, after which the sensor is satisfied again.
        assert harness.materialize("full_refresh", resources=["accounts"]).success
        assert isinstance(evaluate_sensor(harness, "crm_drift_sensor"), dg.SkipReason)

    def test_old_full_refresh(self, harness: Harness) -> None:
        assert harness.materialize("full_refresh").success
        result = evaluate_sensor(harness, "crm_drift_sensor", full_refresh_max_age_hours=1e-9)
        assert isinstance(result, dg.SensorResult)
        requests = result.run_requests or []
        assert sorted(k for r in requests for k in keys(r)) == sorted(
            f"crm/{n}" for n in RESOURCE_NAMES
        )
        assert all(r.run_config == run_config_for("full_refresh") for r in requests)


def test_sync_step_runs_in_the_warehouse_pool(harness: Harness) -> None:
    (assets_def,) = harness.definitions().assets or []
    assert assets_def.op.pool == CRM_POOL  # type: ignore[union-attr]


def test_sensor_preview_cli(harness: Harness, sandbox: SandboxClient) -> None:
    """`dagster sensor preview` against the sandbox, as the README shows it."""
    assert harness.materialize("full_refresh").success
    sandbox.delete("notes", count=1)
    cli = Path(sys.executable).with_name("dagster")
    out = subprocess.run(
        [str(cli), "sensor", "preview", "crm_drift_sensor", "-m", "crm_assets.definitions"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
        check=True,
    )
    assert "returning run requests for 1 run(s)" in out.stdout, out.stdout + out.stderr
    assert "sync_mode: full_refresh" in out.stdout


@pytest.mark.parametrize(
    ("tags", "mode", "trigger"),
    [
        ({}, "incremental", "ui"),  # the UI's "Materialize" sets no tags of ours
        ({"crm/trigger": "cli"}, "full_refresh", "cli"),
        ({"dagster/sensor_name": "crm_change_sensor"}, "incremental", "crm_change_sensor"),
    ],
)
def test_runs_are_tagged_with_mode_and_trigger(
    harness: Harness, tags: dict[str, str], mode: str, trigger: str
) -> None:
    result = harness.materialize(mode, resources=["accounts"], tags=tags)  # type: ignore[arg-type]
    run = harness.instance.get_run_by_id(result.run_id)
    assert run is not None
    assert run.tags["crm/sync_mode"] == mode
    assert run.tags["crm/trigger"] == trigger
    (event,) = result.get_asset_materialization_events()
    assert event.materialization.metadata["trigger"].value == trigger
