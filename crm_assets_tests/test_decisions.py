"""Unit tests of the pure decisions: sync plan, trigger, sensors' rules, in-flight runs."""

import datetime as dt

import dagster as dg
import pytest

from crm_assets.sensors import (
    ChangeProbe,
    DriftProbe,
    decide_change,
    decide_drift,
    format_skip,
    resources_in_flight,
    state_run_key,
)
from crm_assets.sync import (
    ResourceSnapshot,
    cursor_of,
    plan_resource,
    plan_sync,
    trigger_for_run,
)

NOW = dt.datetime(2026, 1, 10, 12, tzinfo=dt.timezone.utc)
WEEK = dt.timedelta(days=8)


class TestPlan:
    def test_full_refresh_when_requested(self) -> None:
        plan = plan_resource("full_refresh", ResourceSnapshot("deals", "2025-01-01T00:00:00Z", 9))
        assert plan.mode == "full_refresh"

    def test_first_incremental_reads_everything(self) -> None:
        plan = plan_resource("incremental", ResourceSnapshot("deals", None, None))
        assert (plan.mode, plan.reason.startswith("no cursor")) == ("incremental", True)

    @pytest.mark.parametrize("rows", [None, 0])
    def test_cursor_without_table_means_interrupted_full_refresh(self, rows: int | None) -> None:
        plan = plan_resource("incremental", ResourceSnapshot("deals", "2025-01-01T00:00:00Z", rows))
        assert plan.mode == "full_refresh"
        assert "interrupted" in plan.reason

    def test_incremental_from_cursor(self) -> None:
        plan = plan_resource("incremental", ResourceSnapshot("deals", "2025-01-01T00:00:00Z", 5))
        assert (
            plan
            == plan_sync("incremental", [ResourceSnapshot("deals", "2025-01-01T00:00:00Z", 5)])[0]
        )
        assert plan.mode == "incremental" and "2025-01-01T00:00:00Z" in plan.reason

    def test_unknown_mode_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="sync mode"):
            plan_resource("sometimes", ResourceSnapshot("deals"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tags", "trigger"),
    [
        ({}, "ui"),
        ({"crm/trigger": "cli"}, "cli"),
        ({"dagster/schedule_name": "crm_incremental_schedule"}, "schedule"),
        ({"dagster/sensor_name": "crm_drift_sensor"}, "crm_drift_sensor"),
        ({"dagster/backfill": "abc"}, "backfill"),
        ({"crm/trigger": "schedule", "dagster/schedule_name": "x"}, "schedule"),
    ],
)
def test_trigger_for_run(tags: dict[str, str], trigger: str) -> None:
    assert trigger_for_run(tags) == trigger


def test_cursor_of_reads_dlt_incremental_state() -> None:
    state = {"incremental": {"updated_at": {"last_value": "2025-03-01T12:00:00Z"}}}
    assert cursor_of(state) == "2025-03-01T12:00:00Z"
    assert cursor_of({}) is None and cursor_of(None) is None
    # After a run over an empty resource dlt keeps the initial value: that is no cursor.
    assert (
        cursor_of({"incremental": {"updated_at": {"last_value": "1970-01-01T00:00:00Z"}}}) is None
    )


class TestChangeDecision:
    def test_never_synced_with_records(self) -> None:
        assert decide_change(ChangeProbe("deals", None, 10, 0)).run

    def test_never_synced_empty_api(self) -> None:
        assert not decide_change(ChangeProbe("deals", None, 0, 0)).run

    def test_records_at_the_cursor_are_not_changes(self) -> None:
        # Three records share the cursor's updated_at: the inclusive probe counts them.
        decision = decide_change(ChangeProbe("deals", "2025-01-01T00:00:00Z", 3, 3))
        assert not decision.run and "no changes" in decision.reason

    def test_new_record_tied_with_the_cursor_is_a_change(self) -> None:
        decision = decide_change(ChangeProbe("deals", "2025-01-01T00:00:00Z", 4, 3))
        assert decision.run and decision.reason.startswith("1 changed")


class TestDriftDecision:
    def probe(self, **kw: object) -> DriftProbe:
        base: dict[str, object] = {
            "resource": "deals",
            "api_total": 100,
            "warehouse_rows": 100,
            "last_full_refresh_at": NOW - dt.timedelta(days=1),
            "changes_pending": False,
        }
        base.update(kw)
        return DriftProbe(**base)  # type: ignore[arg-type]

    def test_in_sync(self) -> None:
        assert not decide_drift(self.probe(), NOW, WEEK).run

    def test_never_full_refreshed(self) -> None:
        assert decide_drift(self.probe(last_full_refresh_at=None), NOW, WEEK).run
        assert decide_drift(self.probe(warehouse_rows=None), NOW, WEEK).run

    def test_too_old(self) -> None:
        old = NOW - dt.timedelta(days=9)
        decision = decide_drift(self.probe(last_full_refresh_at=old), NOW, WEEK)
        assert decision.run and "216 h ago" in decision.reason

    def test_hard_deletes(self) -> None:
        decision = decide_drift(self.probe(api_total=97, changes_pending=True), NOW, WEEK)
        assert decision.run and decision.reason.startswith("3 more row(s)")

    def test_skipped_rows_without_pending_changes(self) -> None:
        assert decide_drift(self.probe(api_total=101), NOW, WEEK).run

    def test_new_records_pending_are_not_drift(self) -> None:
        decision = decide_drift(self.probe(api_total=105, changes_pending=True), NOW, WEEK)
        assert not decision.run and "changes pending" in decision.reason


def test_resources_in_flight() -> None:
    jobs = {"crm_incremental_job": ("notes", "deals", "accounts", "calls")}
    runs = [
        ("__ASSET_JOB", frozenset({dg.AssetKey(["crm", "deals"])})),
        ("crm_incremental_job", None),
    ]
    assert resources_in_flight(runs[:1], jobs) == {"deals"}
    assert resources_in_flight(runs, jobs) == {"notes", "deals", "accounts", "calls"}
    assert resources_in_flight([("other_job", None)], jobs) == set()


def test_run_keys_follow_state() -> None:
    assert state_run_key("s", ["deals", 1]) == state_run_key("s", ["deals", 1])
    assert state_run_key("s", ["deals", 1]) != state_run_key("s", ["deals", 2])


def test_skip_reason_names_every_resource() -> None:
    text = format_skip([decide_change(ChangeProbe("deals", "c", 1, 1))], {"notes"})
    assert "deals: no changes since c" in text and "notes: a run is already queued" in text
