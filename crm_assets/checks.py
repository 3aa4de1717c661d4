"""Asset checks of the CRM assets: what a data engineer trusts after each sync.

Per CRM resource (asset ``crm/<name>``) five checks run in the same run as the materialization,
right after it (the jobs, the UI's "Materialize" and one-asset selections all include the checks
of the selected assets, and only those):

==========================  ========  ==================================================
check                       severity  rule
==========================  ========  ==================================================
``primary_key_unique``      ERROR     no null ``id``, no ``id`` on two rows
``not_null_columns``        ERROR     the contract's NOT NULL columns exist and hold no nulls
``row_count_matches_api``   ERROR     no API record missing from the warehouse (see below);
                            WARN      more rows than the API after a *full refresh*
``no_rejected_records``     WARN      the run quarantined no record in ``_rejected_records``
``freshness_check``         WARN      last successful sync within ``CRM_FRESHNESS_MAX_AGE_HOURS``
==========================  ========  ==================================================

The row count rule (``decide_row_count``, pure):

* after a full refresh: warehouse rows == the API's ``total`` at read time (materialization
  metadata ``api_total``) minus the records that run rejected. Fewer rows: records were lost
  (ERROR). More rows: records deleted in the CRM while the refresh read (WARN).
* after an incremental run the API is asked now (``CrmApiResource.count_changed``). The API may
  legitimately hold more records than the warehouse: records changed at or after the committed
  cursor (created since the run; the next incremental run reads them) and quarantined records
  not in the table. Anything missing beyond that is lost (ERROR). The warehouse may hold more
  rows than the API (hard deletes are invisible to incremental runs; the next full refresh and
  ``crm_drift_sensor`` reconcile them): the check passes and reports them as ``extra_rows``.

The first four checks are one ``@multi_asset_check`` op (one warehouse connection for all of
them, subsettable per asset) in the ``crm_warehouse`` pool, so it never holds DuckDB's single
writer lock while a sync writes. Freshness uses Dagster's ``build_last_update_freshness_checks``
and ``crm_freshness_sensor`` re-evaluates it between syncs (it is the only sensor running by
default: it starts no sync and calls no API, and a freshness check nobody evaluates never warns).

Checks read the warehouse through ``CrmWarehouseResource`` with the destination-neutral dlt SQL
client, and report counts, column names and reasons, never record values (personal data).
Building them does no I/O. Documentation: ``docs/observability.md``.

Environment variables: ``CRM_FRESHNESS_MAX_AGE_HOURS`` (through ``crm_assets.settings``).
"""

import datetime as dt
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from crm_assets import contract
from crm_assets.assets import CRM_POOL
from crm_assets.contract import PRIMARY_KEY, CrmResource, get_resource
from crm_assets.records import REJECTED_TABLE
from crm_assets.resources import CrmApiResource, CrmWarehouseResource
from crm_assets.settings import CrmSettings
from crm_assets.sync import asset_key_for, resource_name_for

CRM_CHECKS_OP = "crm_warehouse_checks"
FRESHNESS_SENSOR = "crm_freshness_sensor"

CHECK_PRIMARY_KEY = "primary_key_unique"
CHECK_NOT_NULL = "not_null_columns"
CHECK_ROW_COUNT = "row_count_matches_api"
CHECK_REJECTED = "no_rejected_records"
CHECK_FRESHNESS = "freshness_check"  # the name Dagster's freshness check factory gives it

WAREHOUSE_CHECKS: Mapping[str, str] = {
    CHECK_PRIMARY_KEY: "ERROR when an `id` is null or appears on more than one row.",
    CHECK_NOT_NULL: (
        "ERROR when a column the CRM contract declares NOT NULL is missing or holds nulls."
    ),
    CHECK_ROW_COUNT: (
        "Warehouse rows against the API's total. After a full refresh they must be equal (minus "
        "rejected records): fewer is ERROR (records lost), more is WARN (deleted while read). "
        "After an incremental run the API may hold more (records changed at/after the cursor, "
        "quarantined records) and fewer (hard deletes, reconciled by the next full refresh); "
        "anything missing beyond that is ERROR."
    ),
    CHECK_REJECTED: (
        "WARN when the run quarantined records that break the contract in _rejected_records."
    ),
}

# The severity each check fails with by default (row_count_matches_api may also fail with WARN,
# see decide_row_count); a passing result carries it too, so the UI shows one severity per check.
CHECK_SEVERITY: Mapping[str, dg.AssetCheckSeverity] = {
    CHECK_PRIMARY_KEY: dg.AssetCheckSeverity.ERROR,
    CHECK_NOT_NULL: dg.AssetCheckSeverity.ERROR,
    CHECK_ROW_COUNT: dg.AssetCheckSeverity.ERROR,
    CHECK_REJECTED: dg.AssetCheckSeverity.WARN,
}

_MAX_EXAMPLES = 5


# --- what the warehouse holds --------------------------------------------------------------------


@dataclass(frozen=True)
class TableProfile:
    """Counts of one warehouse table that the checks judge (no record values)."""

    exists: bool
    rows: int = 0
    null_ids: int = 0
    duplicate_rows: int = 0  # rows beyond the first for every id that appears more than once
    duplicate_examples: tuple[str, ...] = ()
    nulls: Mapping[str, int] = field(default_factory=dict)  # NOT NULL column -> null count
    missing_columns: tuple[str, ...] = ()  # NOT NULL columns the table lacks


def read_table_profile(client: Any, resource: CrmResource) -> TableProfile:
    """Profiles ``resource``'s table in one scan with a dlt SQL client (any destination)."""
    table = client.make_qualified_table_name(resource.name)
    try:
        # An empty result still describes the columns, whatever the destination.
        with client.execute_query(f"SELECT * FROM {table} WHERE 1 = 0") as cursor:
            present = {str(d[0]) for d in cursor.description}
    except Exception:  # noqa: BLE001 - the table does not exist (yet)
        return TableProfile(exists=False)
    checked = [c for c in resource.not_null_columns if c in present]
    missing = tuple(c for c in resource.not_null_columns if c not in present)
    esc = client.escape_column_name
    expressions = ["COUNT(*)"]
    if PRIMARY_KEY in present:
        expressions.append(f"COUNT(DISTINCT {esc(PRIMARY_KEY)})")
    expressions += [f"COUNT(*) - COUNT({esc(c)})" for c in checked]
    row = client.execute_sql(f"SELECT {', '.join(expressions)} FROM {table}")[0]
    rows = int(row[0])
    if PRIMARY_KEY not in present:
        return TableProfile(True, rows, missing_columns=missing)
    distinct_ids = int(row[1])
    nulls = {c: int(v) for c, v in zip(checked, row[2:], strict=True)}
    null_ids = nulls.get(PRIMARY_KEY, 0)
    duplicate_rows = rows - null_ids - distinct_ids
    examples: tuple[str, ...] = ()
    if duplicate_rows:
        pk = esc(PRIMARY_KEY)
        found = client.execute_sql(
            f"SELECT {pk} FROM {table} WHERE {pk} IS NOT NULL GROUP BY {pk} "
            f"HAVING COUNT(*) > 1 ORDER BY {pk} LIMIT {_MAX_EXAMPLES}"
        )
        examples = tuple(str(r[0]) for r in found)
    return TableProfile(True, rows, null_ids, duplicate_rows, examples, nulls, missing)


def rejected_reasons(
    client: Any, resource: str, since: dt.datetime, until: dt.datetime
) -> dict[str, int]:
    """Reasons (and counts) of ``resource``'s records quarantined between ``since`` and ``until``.

    The quarantine is written in its own dlt load right after the run's main load, so the run is
    identified by the time its gate rejected the records (``rejected_at``), not by a load id.
    """
    table = client.make_qualified_table_name(REJECTED_TABLE)
    try:
        rows = client.execute_sql(
            f"SELECT reason, COUNT(*) FROM {table} WHERE resource = %s "
            "AND rejected_at >= %s AND rejected_at <= %s GROUP BY reason ORDER BY reason",
            resource,
            since,
            until,
        )
    except Exception:  # noqa: BLE001 - no quarantine table: nothing was ever rejected
        return {}
    return {str(reason): int(count) for reason, count in rows}


def open_quarantine(client: Any, resource: str) -> int:
    """Quarantined ids of ``resource`` that are not in its table (still missing from it)."""
    rejected = client.make_qualified_table_name(REJECTED_TABLE)
    table = client.make_qualified_table_name(resource)
    pk = client.escape_column_name(PRIMARY_KEY)
    try:
        rows = client.execute_sql(
            f"SELECT COUNT(DISTINCT r.record_id) FROM {rejected} r WHERE r.resource = %s "
            f"AND r.record_id IS NOT NULL "
            f"AND NOT EXISTS (SELECT 1 FROM {table} t WHERE t.{pk} = r.record_id)",
            resource,
        )
    except Exception:  # noqa: BLE001 - no quarantine table (or no table yet)
        return 0
    return int(rows[0][0]) if rows else 0


# --- what the last sync reported -----------------------------------------------------------------


@dataclass(frozen=True)
class LastSync:
    """The latest materialization of one asset, as the checks need it."""

    run_id: str
    run_started_at: dt.datetime
    materialized_at: dt.datetime
    sync_mode: str
    api_total: int
    rejected_records: int
    cursor_after: str | None


def _value(metadata: Mapping[str, Any], key: str) -> Any:
    entry = metadata.get(key)
    return getattr(entry, "value", entry)


def last_sync(instance: dg.DagsterInstance, key: dg.AssetKey) -> LastSync | None:
    """What the latest materialization of ``key`` recorded; ``None`` before the first one."""
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    metadata = event.asset_materialization.metadata
    materialized_at = dt.datetime.fromtimestamp(event.timestamp, dt.timezone.utc)
    started_at = materialized_at
    record = instance.get_run_record_by_id(event.run_id)
    if record is not None:
        started = record.start_time or record.create_timestamp.timestamp()
        started_at = dt.datetime.fromtimestamp(started, dt.timezone.utc)
    return LastSync(
        run_id=event.run_id,
        run_started_at=started_at,
        materialized_at=materialized_at,
        sync_mode=str(_value(metadata, "sync_mode") or ""),
        api_total=int(_value(metadata, "api_total") or 0),
        rejected_records=int(_value(metadata, "rejected_records") or 0),
        cursor_after=_value(metadata, "cursor_after") or None,
    )


# --- the rules (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: passed or not, its severity and a one-line explanation."""

    passed: bool
    severity: dg.AssetCheckSeverity
    description: str


def _ok(description: str) -> Verdict:
    return Verdict(True, dg.AssetCheckSeverity.ERROR, description)


def decide_row_count(
    sync_mode: str,
    warehouse_rows: int,
    api_total: int,
    rejected: int,
    api_pending: int = 0,
) -> Verdict:
    """The ``row_count_matches_api`` rule (see the module docstring).

    ``api_total``: after a full refresh the total the run read; after an incremental run the
    API's total now. ``rejected``: after a full refresh the records that run rejected; after an
    incremental run the quarantined ids absent from the table. ``api_pending``: API records at or
    after the committed cursor (incremental only).
    """
    if sync_mode == "full_refresh":
        expected = api_total - rejected
        if warehouse_rows == expected:
            return _ok(f"{warehouse_rows} rows = API total {api_total} - {rejected} rejected")
        if warehouse_rows < expected:
            return Verdict(
                False,
                dg.AssetCheckSeverity.ERROR,
                f"{expected - warehouse_rows} record(s) of the API are missing after a full "
                f"refresh: {warehouse_rows} rows, API total {api_total}, {rejected} rejected",
            )
        return Verdict(
            False,
            dg.AssetCheckSeverity.WARN,
            f"{warehouse_rows - expected} more row(s) than the API's total {api_total}: records "
            "deleted in the CRM while the full refresh read; the next full refresh removes them",
        )
    missing = api_total - warehouse_rows
    allowed = api_pending + rejected
    if missing > allowed:
        return Verdict(
            False,
            dg.AssetCheckSeverity.ERROR,
            f"{missing - allowed} record(s) of the API are missing from the warehouse: API total "
            f"{api_total}, {warehouse_rows} rows, {api_pending} changed at/after the cursor, "
            f"{rejected} quarantined. Run a full refresh to reload them",
        )
    if missing < 0:
        return _ok(
            f"{-missing} more row(s) than the API (records hard-deleted in the CRM; the next "
            f"full refresh removes them); no record missing"
        )
    return _ok(
        f"{warehouse_rows} rows, API total {api_total}: the difference ({missing}) is within "
        f"the {api_pending} record(s) changed at/after the cursor and {rejected} quarantined"
    )


def decide_primary_key(profile: TableProfile) -> Verdict:
    """``primary_key_unique``: every row has an ``id`` and no ``id`` repeats."""
    if profile.null_ids or profile.duplicate_rows or PRIMARY_KEY in profile.missing_columns:
        problems = []
        if PRIMARY_KEY in profile.missing_columns:
            problems.append("the table has no id column")
        if profile.null_ids:
            problems.append(f"{profile.null_ids} row(s) without id")
        if profile.duplicate_rows:
            problems.append(
                f"{profile.duplicate_rows} duplicate row(s), e.g. id "
                + ", ".join(profile.duplicate_examples)
            )
        return Verdict(False, dg.AssetCheckSeverity.ERROR, "; ".join(problems))
    return _ok(f"{profile.rows} rows, {profile.rows} distinct ids")


def decide_not_null(profile: TableProfile) -> Verdict:
    """``not_null_columns``: the contract's NOT NULL columns exist and hold no nulls."""
    problems = [f"{c} is missing" for c in profile.missing_columns]
    problems += [f"{c}: {n} null(s)" for c, n in profile.nulls.items() if n]
    if problems:
        return Verdict(False, dg.AssetCheckSeverity.ERROR, "; ".join(problems))
    return _ok(f"no nulls in {len(profile.nulls)} NOT NULL column(s)")


def decide_rejected(reported: int, stored: Mapping[str, int]) -> Verdict:
    """``no_rejected_records``: the run's sync rejected nothing."""
    count = max(reported, sum(stored.values()))
    if not count:
        return _ok("no record rejected")
    reasons = "; ".join(f"{n}x {reason}" for reason, n in stored.items())
    return Verdict(
        False,
        dg.AssetCheckSeverity.WARN,
        f"{count} record(s) broke the contract and were kept in {REJECTED_TABLE} instead"
        + (f" ({reasons})" if reasons else ""),
    )


# --- the checks ----------------------------------------------------------------------------------


def _result(
    resource: str, check: str, verdict: Verdict, metadata: Mapping[str, Any]
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=asset_key_for(resource),
        check_name=check,
        passed=verdict.passed,
        severity=CHECK_SEVERITY[check] if verdict.passed else verdict.severity,
        description=verdict.description,
        metadata=metadata,
    )


def _int(value: int) -> dg.IntMetadataValue:
    return dg.MetadataValue.int(int(value))


def _no_table_results(
    resource: str, checks: Sequence[str], sync: LastSync | None
) -> Iterator[dg.AssetCheckResult]:
    # dlt creates no table for a resource that never returned a record: valid when the API has
    # none; otherwise the table was lost (or never loaded).
    empty_api = sync is not None and sync.api_total == 0
    if empty_api:
        verdict = _ok("no table: the API had no records at the last sync")
    elif sync is None:
        verdict = Verdict(False, dg.AssetCheckSeverity.WARN, "never synced: no table yet")
    else:
        verdict = Verdict(
            False,
            dg.AssetCheckSeverity.ERROR,
            f"the table is missing although the last sync saw {sync.api_total} API record(s)",
        )
    for check in checks:
        if check == CHECK_REJECTED and sync is not None:
            continue  # judged from the run's own numbers below
        yield _result(resource, check, verdict, {"warehouse_rows": _int(0)})


def _evaluate(
    context: dg.AssetCheckExecutionContext,
    client: Any,
    crm_api: CrmApiResource,
    resource: CrmResource,
    checks: Sequence[str],
    dataset: str,
) -> Iterator[dg.AssetCheckResult]:
    name = resource.name
    sync = last_sync(context.instance, asset_key_for(name))
    if sync is not None and sync.run_id != context.run.run_id:
        context.log.info(f"{name}: checking the warehouse against the sync of run {sync.run_id}")
    profile = read_table_profile(client, resource)
    if not profile.exists:
        yield from _no_table_results(name, checks, sync)
        checks = [c for c in checks if c == CHECK_REJECTED and sync is not None]
    rows = _int(profile.rows)

    if CHECK_PRIMARY_KEY in checks:
        yield _result(
            name,
            CHECK_PRIMARY_KEY,
            decide_primary_key(profile),
            {
                "warehouse_rows": rows,
                "null_ids": _int(profile.null_ids),
                "duplicate_rows": _int(profile.duplicate_rows),
                "duplicate_ids": ", ".join(profile.duplicate_examples),
            },
        )
    if CHECK_NOT_NULL in checks:
        yield _result(
            name,
            CHECK_NOT_NULL,
            decide_not_null(profile),
            {
                "warehouse_rows": rows,
                "columns_checked": ", ".join(profile.nulls),
                "null_counts": dg.MetadataValue.json(dict(profile.nulls)),
                "missing_columns": ", ".join(profile.missing_columns),
            },
        )
    if CHECK_ROW_COUNT in checks:
        if sync is None:
            yield _result(
                name,
                CHECK_ROW_COUNT,
                Verdict(False, dg.AssetCheckSeverity.WARN, "never synced: nothing to compare"),
                {"warehouse_rows": rows},
            )
        else:
            yield _row_count_result(client, crm_api, resource, sync, profile.rows)
    if CHECK_REJECTED in checks:
        if sync is None:
            yield _result(name, CHECK_REJECTED, _ok("never synced: nothing rejected"), {})
        else:
            stored = rejected_reasons(client, name, sync.run_started_at, sync.materialized_at)
            verdict = decide_rejected(sync.rejected_records, stored)
            yield _result(
                name,
                CHECK_REJECTED,
                verdict,
                {
                    "rejected_records": _int(max(sync.rejected_records, sum(stored.values()))),
                    "reasons": dg.MetadataValue.json(stored),
                    "sync_run_id": sync.run_id,
                    # Where to look: the raw records stay in the warehouse, not in Dagster.
                    "inspect": dg.MetadataValue.md(
                        f"`SELECT record_id, reason, rejected_at FROM {dataset}.{REJECTED_TABLE} "
                        f"WHERE resource = '{name}' ORDER BY rejected_at DESC`"
                    ),
                },
            )


def _row_count_result(
    client: Any,
    crm_api: CrmApiResource,
    resource: CrmResource,
    sync: LastSync,
    warehouse_rows: int,
) -> dg.AssetCheckResult:
    name = resource.name
    metadata: dict[str, Any] = {
        "warehouse_rows": _int(warehouse_rows),
        "sync_mode": sync.sync_mode,
        "sync_run_id": sync.run_id,
    }
    if sync.sync_mode == "full_refresh":
        # The total the refresh read, not a later one: records created since are no error.
        verdict = decide_row_count(
            "full_refresh", warehouse_rows, sync.api_total, sync.rejected_records
        )
        metadata.update(api_total=_int(sync.api_total), rejected=_int(sync.rejected_records))
        return _result(name, CHECK_ROW_COUNT, verdict, metadata)
    try:
        # Total first: a record created between the two probes then only widens the allowance.
        api_total = crm_api.count_changed(resource, None)
        pending = crm_api.count_changed(resource, sync.cursor_after)
    except Exception as exc:  # noqa: BLE001 - already redacted by count_changed
        verdict = Verdict(
            False, dg.AssetCheckSeverity.WARN, f"could not ask the CRM API for its total: {exc}"
        )
        return _result(name, CHECK_ROW_COUNT, verdict, metadata)
    quarantined = open_quarantine(client, name)
    verdict = decide_row_count("incremental", warehouse_rows, api_total, quarantined, pending)
    metadata.update(
        api_total=_int(api_total),
        api_changed_since_cursor=_int(pending),
        quarantined_missing=_int(quarantined),
        extra_rows=_int(max(warehouse_rows - api_total, 0)),
        cursor=sync.cursor_after or "",
    )
    return _result(name, CHECK_ROW_COUNT, verdict, metadata)


def _warehouse_check_specs(resources: Sequence[CrmResource]) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            name=check,
            asset=asset_key_for(resource.name),
            description=description,
        )
        for resource in resources
        for check, description in WAREHOUSE_CHECKS.items()
    ]


def build_warehouse_checks(
    resources: Sequence[CrmResource] | None = None,
) -> dg.AssetChecksDefinition:
    """The four warehouse checks of every CRM asset (default: the contract's), as one op."""
    resources = contract.CRM_RESOURCES if resources is None else resources

    @dg.multi_asset_check(
        name=CRM_CHECKS_OP,
        specs=_warehouse_check_specs(resources),
        can_subset=True,
        # One writer at a time on DuckDB: the checks queue behind syncs like syncs do.
        pool=CRM_POOL,
        description="Primary key, NOT NULL columns, rows against the API, rejected records.",
    )
    def crm_warehouse_checks(
        context: dg.AssetCheckExecutionContext,
        crm_api: CrmApiResource,
        warehouse: CrmWarehouseResource,
    ) -> Iterator[dg.AssetCheckResult]:
        by_resource: dict[str, list[str]] = {}
        for key in sorted(context.selected_asset_check_keys, key=str):
            by_resource.setdefault(resource_name_for(key.asset_key), []).append(key.name)
        with warehouse.pipeline() as pipeline, pipeline.sql_client() as client:
            for name, checks in by_resource.items():
                yield from _evaluate(
                    context, client, crm_api, get_resource(name), checks, warehouse.dataset_name
                )

    return crm_warehouse_checks


def build_freshness_checks(
    settings: CrmSettings, resources: Sequence[CrmResource] | None = None
) -> list[dg.AssetChecksDefinition]:
    """``freshness_check`` per CRM asset: WARN when the last sync is older than the max age."""
    resources = contract.CRM_RESOURCES if resources is None else resources
    return list(
        dg.build_last_update_freshness_checks(
            assets=[asset_key_for(r.name) for r in resources],
            lower_bound_delta=dt.timedelta(hours=settings.freshness_max_age_hours),
            severity=dg.AssetCheckSeverity.WARN,
        )
    )


@dataclass(frozen=True)
class CrmChecks:
    """The asset checks of the CRM assets and the sensor that keeps freshness evaluated."""

    checks: list[dg.AssetChecksDefinition]
    sensors: list[dg.SensorDefinition]


def build_checks(settings: CrmSettings) -> CrmChecks:
    """Every asset check of the CRM assets and ``crm_freshness_sensor``. Builds objects only."""
    # Dagster marks the freshness check factories "superseded" by FreshnessPolicy. A policy is
    # no asset check (it is not shown or run with the other checks) and needs the opt-in
    # freshness daemon; the factories stay supported. Silenced so every CLI load stays quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.SupersessionWarning)
        freshness = build_freshness_checks(settings)
        sensor = dg.build_sensor_for_freshness_checks(
            freshness_checks=freshness,
            name=FRESHNESS_SENSOR,
            minimum_interval_seconds=settings.sensor_interval_seconds,
            # Running by default, unlike the sync automations: it starts no sync and calls no
            # API, and a freshness check nobody evaluates between syncs can never warn.
            default_status=dg.DefaultSensorStatus.RUNNING,
        )
    return CrmChecks(checks=[build_warehouse_checks(), *freshness], sensors=[sensor])
