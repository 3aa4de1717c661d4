"""Sensors that pick the sync mode per resource: ``crm_change_sensor`` and ``crm_drift_sensor``.

Each decision is a pure function (``decide_changes``, ``decide_drift``, ``resources_in_flight``)
that the unit tests call directly; the sensors only gather inputs through ``CrmApiResource``
(one ``limit=1`` probe per resource) and ``CrmWarehouseResource`` (cursors, row counts, the
last full refresh), then turn decisions into ``RunRequest``s or a ``SkipReason``.

* ``crm_change_sensor``: per resource, probe ``updated_since=<cursor>`` and compare the API's
  ``total`` with the warehouse rows at or after the cursor; request one incremental run for
  exactly the resources that changed.
* ``crm_drift_sensor``: request a full refresh of exactly one resource when it never had one, its
  last one is older than the max age, the warehouse holds more rows than the API (hard deletes),
  or, with no change pending, the counts differ (rows skipped).

Both skip resources that a queued or running run already covers, and use run keys derived from
the observed state so that the same state never launches two runs. Their run requests carry
``crm/trigger``, ``crm/sync_mode`` and one ``crm/resource.<name>`` tag per requested resource,
which the run queue limits to one run per resource (``crm_assets.jobs.resource_tags``).

Environment variables: ``CRM_SENSOR_INTERVAL_SECONDS``, ``CRM_FULL_REFRESH_MAX_AGE_HOURS``
(through ``crm_assets.settings``).
"""

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

from crm_assets.contract import CRM_RESOURCES, RESOURCE_NAMES, CrmResource
from crm_assets.jobs import CRM_ASSET_SELECTION, resource_tags, run_config_for
from crm_assets.records import LAST_FULL_REFRESH_KEY, STATE_KEY
from crm_assets.resources import CrmApiResource, CrmWarehouseResource
from crm_assets.settings import CrmSettings
from crm_assets.sync import (
    SYNC_MODE_TAG,
    TRIGGER_TAG,
    asset_key_for,
    cursor_of,
    resource_name_for,
)

CHANGE_SENSOR = "crm_change_sensor"
DRIFT_SENSOR = "crm_drift_sensor"
_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


# --- pure decisions ----------------------------------------------------------------------------


def resources_in_flight(
    runs: Iterable[tuple[str, frozenset[dg.AssetKey] | None]],
    job_resources: Mapping[str, Sequence[str]],
) -> set[str]:
    """CRM resources covered by unfinished runs, given ``(job_name, asset_selection)`` pairs.

    A run without an explicit asset selection covers every CRM resource of its job.
    """
    busy: set[str] = set()
    for job_name, selection in runs:
        if selection is None:
            busy.update(job_resources.get(job_name, ()))
            continue
        busy.update(
            resource_name_for(k) for k in selection if resource_name_for(k) in RESOURCE_NAMES
        )
    return busy


@dataclass(frozen=True)
class ChangeProbe:
    """One resource as the change sensor sees it."""

    resource: str
    cursor: str | None
    api_changed_total: int  # API records with updated_at >= cursor (all records without one)
    warehouse_rows_at_or_after_cursor: int  # warehouse rows with updated_at >= cursor


@dataclass(frozen=True)
class Decision:
    """What a sensor decided for one resource."""

    resource: str
    run: bool
    reason: str


def decide_change(probe: ChangeProbe) -> Decision:
    """Run an incremental sync when the API has records at/after the cursor the warehouse lacks.

    The cursor is inclusive (records sharing its ``updated_at`` are re-read and deduplicated), so
    the API's count is compared with the warehouse's rows at or after the cursor, not with zero.
    """
    if probe.cursor is None:
        if probe.api_changed_total > 0:
            return Decision(probe.resource, True, "never synced")
        return Decision(probe.resource, False, "never synced and the API has no records")
    new = probe.api_changed_total - probe.warehouse_rows_at_or_after_cursor
    if new > 0:
        return Decision(probe.resource, True, f"{new} changed record(s) since {probe.cursor}")
    return Decision(probe.resource, False, f"no changes since {probe.cursor}")


@dataclass(frozen=True)
class DriftProbe:
    """One resource as the drift sensor sees it."""

    resource: str
    api_total: int
    warehouse_rows: int | None  # None: no table yet
    last_full_refresh_at: dt.datetime | None
    changes_pending: bool  # the change probe sees records the warehouse lacks


def decide_drift(probe: DriftProbe, now: dt.datetime, max_age: dt.timedelta) -> Decision:
    """Run a full refresh when the warehouse can no longer be trusted to equal the API."""
    name = probe.resource
    if probe.last_full_refresh_at is None or probe.warehouse_rows is None:
        return Decision(name, True, "never had a full refresh")
    age = now - probe.last_full_refresh_at
    if age > max_age:
        hours = age.total_seconds() / 3600
        return Decision(name, True, f"last full refresh {hours:.0f} h ago (max {max_age})")
    if probe.warehouse_rows > probe.api_total:
        extra = probe.warehouse_rows - probe.api_total
        return Decision(name, True, f"{extra} more row(s) in the warehouse than in the API")
    if not probe.changes_pending and probe.warehouse_rows != probe.api_total:
        return Decision(
            name,
            True,
            f"warehouse has {probe.warehouse_rows} rows, the API {probe.api_total}, "
            "with no change pending",
        )
    if probe.changes_pending:
        return Decision(name, False, "changes pending: the incremental sync catches up first")
    return Decision(name, False, f"warehouse equals the API ({probe.api_total} rows)")


def state_run_key(prefix: str, parts: Iterable[object]) -> str:
    """A run key that changes exactly when the observed state changes."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]
    return f"{prefix}:{digest}"


def format_skip(decisions: Iterable[Decision], busy: Iterable[str]) -> str:
    """One line per resource saying why nothing was requested."""
    lines = [f"{d.resource}: {d.reason}" for d in decisions]
    lines += [f"{name}: a run is already queued or in progress" for name in sorted(busy)]
    return "; ".join(lines) or "no CRM resources"


# --- gathering inputs --------------------------------------------------------------------------


# Jobs that cover every CRM asset when a run of them has no explicit asset selection.
_JOB_RESOURCES: Mapping[str, Sequence[str]] = {
    "crm_incremental_job": RESOURCE_NAMES,
    "crm_full_refresh_job": RESOURCE_NAMES,
    "__ASSET_JOB": RESOURCE_NAMES,
}


def _busy_resources(context: dg.SensorEvaluationContext) -> set[str]:
    runs = context.instance.get_runs(filters=dg.RunsFilter(statuses=_IN_FLIGHT))
    return resources_in_flight(((r.job_name, r.asset_selection) for r in runs), _JOB_RESOURCES)


def _change_probe(
    crm_api: CrmApiResource,
    warehouse: CrmWarehouseResource,
    pipeline: Any,
    resource: CrmResource,
    cursor: str | None,
) -> ChangeProbe:
    """What the API has at/after the cursor (one ``limit=1`` call) and what the warehouse has."""
    return ChangeProbe(
        resource=resource.name,
        cursor=cursor,
        api_changed_total=crm_api.count_changed(resource, cursor),
        warehouse_rows_at_or_after_cursor=(
            warehouse.count_rows_since(pipeline, resource.name, cursor) if cursor else 0
        ),
    )


def _duckdb_busy(busy: Iterable[str]) -> str:
    # DuckDB has one writer and locks its file against readers in other processes: reading it
    # now would fail, or worse be mistaken for an empty warehouse.
    return (
        f"a run syncing {', '.join(sorted(busy))} holds the DuckDB warehouse; "
        "checking again after it finishes"
    )


def _parse_time(value: object) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def build_sensors(settings: CrmSettings) -> list[dg.SensorDefinition]:
    """``crm_change_sensor`` and ``crm_drift_sensor`` (both off by default)."""
    max_age = dt.timedelta(hours=settings.full_refresh_max_age_hours)
    resources: Sequence[CrmResource] = CRM_RESOURCES

    @dg.sensor(
        name=CHANGE_SENSOR,
        asset_selection=CRM_ASSET_SELECTION,
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Requests an incremental run for exactly the CRM resources that changed.",
    )
    def crm_change_sensor(
        context: dg.SensorEvaluationContext,
        crm_api: CrmApiResource,
        warehouse: CrmWarehouseResource,
    ) -> dg.SensorResult | dg.SkipReason:
        busy = _busy_resources(context)
        if busy and warehouse.destination == "duckdb":
            return dg.SkipReason(_duckdb_busy(busy))
        candidates = [r for r in resources if r.name not in busy]
        decisions: list[Decision] = []
        with warehouse.pipeline() as pipeline:
            states = warehouse.resource_states(pipeline)
            for resource in candidates:
                cursor = cursor_of(states.get(resource.name))
                probe = _change_probe(crm_api, warehouse, pipeline, resource, cursor)
                decisions.append(decide_change(probe))
        to_run = sorted(d.resource for d in decisions if d.run)
        if not to_run:
            return dg.SkipReason(format_skip(decisions, busy))
        key_parts = [(d.resource, d.reason) for d in decisions if d.run]
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=state_run_key(CHANGE_SENSOR, key_parts),
                    asset_selection=[asset_key_for(n) for n in to_run],
                    run_config=run_config_for("incremental"),
                    tags={
                        TRIGGER_TAG: CHANGE_SENSOR,
                        SYNC_MODE_TAG: "incremental",
                        **resource_tags(to_run),
                    },
                )
            ]
        )

    @dg.sensor(
        name=DRIFT_SENSOR,
        asset_selection=CRM_ASSET_SELECTION,
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=(
            "Requests a full refresh of exactly the CRM resource whose warehouse table drifted "
            "from the API (hard deletes, skipped rows) or whose last full refresh is too old."
        ),
    )
    def crm_drift_sensor(
        context: dg.SensorEvaluationContext,
        crm_api: CrmApiResource,
        warehouse: CrmWarehouseResource,
    ) -> dg.SensorResult | dg.SkipReason:
        busy = _busy_resources(context)
        if busy and warehouse.destination == "duckdb":
            return dg.SkipReason(_duckdb_busy(busy))
        candidates = [r for r in resources if r.name not in busy]
        now = dt.datetime.now(dt.timezone.utc)
        decisions: list[tuple[Decision, DriftProbe]] = []
        with warehouse.pipeline() as pipeline:
            states = warehouse.resource_states(pipeline)
            counts = warehouse.row_counts(pipeline, [r.name for r in candidates])
            for resource in candidates:
                state = states.get(resource.name) or {}
                cursor = cursor_of(state)
                changed = decide_change(
                    _change_probe(crm_api, warehouse, pipeline, resource, cursor)
                )
                probe = DriftProbe(
                    resource=resource.name,
                    api_total=crm_api.count_changed(resource, None),
                    warehouse_rows=counts.get(resource.name),
                    last_full_refresh_at=_parse_time(
                        state.get(STATE_KEY, {}).get(LAST_FULL_REFRESH_KEY)
                    ),
                    changes_pending=changed.run,
                )
                decisions.append((decide_drift(probe, now, max_age), probe))
        requests = [
            dg.RunRequest(
                run_key=state_run_key(
                    DRIFT_SENSOR,
                    [
                        p.resource,
                        d.reason,
                        p.last_full_refresh_at,
                    ],
                ),
                asset_selection=[asset_key_for(d.resource)],
                run_config=run_config_for("full_refresh"),
                tags={
                    TRIGGER_TAG: DRIFT_SENSOR,
                    SYNC_MODE_TAG: "full_refresh",
                    **resource_tags([d.resource]),
                },
            )
            for d, p in decisions
            if d.run
        ]
        if not requests:
            return dg.SkipReason(format_skip([d for d, _ in decisions], busy))
        return dg.SensorResult(run_requests=requests)

    return [crm_change_sensor, crm_drift_sensor]
