"""How one Dagster run syncs the selected CRM resources: decisions (pure) and the run itself.

The decisions are small pure functions that the asset, the sensors and the unit tests call:

* ``plan_sync`` picks the mode per resource (the requested one, or a full refresh when the
  warehouse lost a table whose cursor survived, i.e. an interrupted full refresh).
* ``trigger_for_run`` names what started a run (``ui``, ``cli``, ``schedule``, a sensor name).

``run_crm_sync`` is the body of the ``@dlt_assets`` function: it builds the real source with the
injected key, runs it through ``DagsterDltResource.run`` once per mode, and yields one
``MaterializeResult`` per asset with the metadata a data engineer needs. Every failure surfaces
as a ``CrmSyncError`` whose message is redacted.

Environment variables: none (settings are passed in).
"""

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import dlt as dlt_lib
import requests
from dagster_dlt import DagsterDltResource, DagsterDltTranslator

from crm_assets.contract import CURSOR_FIELD, RESOURCES_BY_NAME, CrmResource
from crm_assets.pagination import CrmApiError, ResourceSyncStats, offset_of_url
from crm_assets.records import REJECTED_TABLE, RejectSink
from crm_assets.redaction import CrmSyncError, redacted_error, redacted_logging
from crm_assets.resources import CrmApiResource, CrmConfigurationError, CrmWarehouseResource
from crm_assets.settings import CrmSettings
from crm_assets.source import INITIAL_CURSOR, SYNC_MODES, SyncMode, build_crm_source

SYNC_MODE_TAG = "crm/sync_mode"
TRIGGER_TAG = "crm/trigger"
ASSET_KEY_PREFIX = "crm"


class CrmSyncConfig(dg.Config):
    """Run config of the CRM assets: ``incremental`` (default) or ``full_refresh``."""

    sync_mode: SyncMode = "incremental"


def asset_key_for(resource_name: str) -> dg.AssetKey:
    """``crm/<resource>``."""
    return dg.AssetKey([ASSET_KEY_PREFIX, resource_name])


def resource_name_for(key: dg.AssetKey) -> str:
    """The CRM resource of an asset key ``crm/<resource>``."""
    return key.path[-1]


# --- decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceSnapshot:
    """What the warehouse knows about one resource before a run."""

    resource: str
    cursor: str | None = None
    row_count: int | None = None  # None: the table does not exist


@dataclass(frozen=True)
class ResourcePlan:
    """The mode one resource is synced in, and why."""

    resource: str
    mode: SyncMode
    reason: str


def plan_resource(requested: SyncMode, snapshot: ResourceSnapshot) -> ResourcePlan:
    """The mode for one resource given the requested mode and the warehouse's state."""
    if requested not in SYNC_MODES:
        raise ValueError(f"sync mode must be one of {SYNC_MODES}, got {requested!r}")
    name = snapshot.resource
    if requested == "full_refresh":
        return ResourcePlan(name, "full_refresh", "full refresh requested")
    if snapshot.cursor is None:
        return ResourcePlan(name, "incremental", "no cursor yet: the first run reads everything")
    if not snapshot.row_count:
        return ResourcePlan(
            name,
            "full_refresh",
            "a cursor exists but the table is missing or empty (an interrupted full refresh?): "
            "re-reading everything",
        )
    return ResourcePlan(name, "incremental", f"changes since {snapshot.cursor}")


def plan_sync(requested: SyncMode, snapshots: Sequence[ResourceSnapshot]) -> list[ResourcePlan]:
    """``plan_resource`` for every selected resource."""
    return [plan_resource(requested, s) for s in snapshots]


def trigger_for_run(tags: Mapping[str, str]) -> str:
    """What started a run: an explicit ``crm/trigger`` tag, else schedule, sensor or backfill
    from Dagster's own tags, else ``ui`` (``dagster job execute`` passes ``crm/trigger=cli``)."""
    if tags.get(TRIGGER_TAG):
        return tags[TRIGGER_TAG]
    if tags.get("dagster/schedule_name"):
        return "schedule"
    if tags.get("dagster/sensor_name"):
        return tags["dagster/sensor_name"]
    if tags.get("dagster/backfill"):
        return "backfill"
    return "ui"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _resource_of_url(url: str | None) -> str:
    path = urlsplit(url or "").path.rstrip("/")
    return path.rsplit("/", 1)[-1] or "the CRM API"


def describe_failure(exc: BaseException) -> str | None:
    """A one-line, key-free explanation of a known failure cause anywhere in ``exc``'s chain.

    ``None`` when no known cause is found (the caller then lists the whole redacted chain).
    Built from the status, the URL's path and its ``offset`` only: never from an exception's
    message (it carries the URL with the key) nor a response body (records are personal data).
    """

    def where(request: Any) -> tuple[str, str]:
        url = getattr(request, "url", None)
        offset = offset_of_url(url) if url else None
        return _resource_of_url(url), "" if offset is None else f" at offset {offset}"

    for cause in _chain(exc):
        if isinstance(cause, CrmApiError):
            return str(cause)
        if isinstance(cause, requests.HTTPError) and cause.response is not None:
            status = cause.response.status_code
            resource, at = where(cause.response.request)
            if status in (401, 403):
                return f"CRM rejected the API key ({status}) for {resource}"
            if status == 429 or status >= 500:
                return f"CRM API answered {status} for {resource}{at}, also after every retry"
            return f"CRM API answered {status} for {resource}{at} (not retried: a client error)"
        if isinstance(cause, requests.Timeout):
            resource, at = where(cause.request)
            return (
                f"the CRM API did not answer {resource}{at} within the request timeout, "
                "also after every retry"
            )
        if isinstance(cause, requests.ConnectionError):
            resource, _ = where(cause.request)
            return f"could not connect to the CRM API for {resource}, also after every retry"
        if isinstance(cause, requests.exceptions.ChunkedEncodingError):
            resource, at = where(cause.request)
            return f"the CRM API broke off its answer for {resource}{at}, also after every retry"
    return None


def cursor_of(resource_state: Mapping[str, Any] | None) -> str | None:
    """The committed ``updated_at`` cursor in a dlt resource state, if any.

    dlt stores the initial value as the cursor after a run that read no record (an empty
    resource); that is no cursor: nothing was loaded, so nothing can have been lost.
    """
    if not resource_state:
        return None
    value = resource_state.get("incremental", {}).get(CURSOR_FIELD, {}).get("last_value")
    if value is None or str(value) == INITIAL_CURSOR:
        return None
    return str(value)


# --- the run -----------------------------------------------------------------------------------


# dagster-dlt's metadata keys that are dropped: temporary file paths (``jobs``) deleted with the
# run's working directory, load times that ``duration_s`` covers, and names that dlt leaves out
# of runs with nothing to load (the asset spec carries ``dagster/table_name`` as
# ``<dataset>.<table>``; dlt's ``<destination>.<dataset>.<table>`` is no SQL name).
_DLT_KEYS_DROPPED = frozenset(
    {
        "jobs",
        "first_run",
        "started_at",
        "finished_at",
        "dataset_name",
        "destination_name",
        "destination_type",
        "dagster/table_name",
        "rows_loaded",
    }
)


def _text_or_null(value: str | None) -> dg.MetadataValue:
    # Null, not "", when there is nothing: the UI then says "null" instead of showing a blank.
    return dg.MetadataValue.text(value) if value else dg.MetadataValue.null()


def _metadata_for(
    resource: str,
    plan: ResourcePlan,
    trigger: str,
    stats: ResourceSyncStats,
    dlt_metadata: Mapping[str, Any],
    cursor_before: str | None,
    cursor_after: str | None,
    row_count: int | None,
    duration_s: float,
    load_id: str | None,
    rejected: int,
    new_columns: Sequence[str] = (),
) -> dict[str, Any]:
    """The materialization metadata of one asset (every key: ``docs/observability.md``).

    Counts are int metadata and durations float metadata, so the UI plots them across runs.
    ``load_id`` is null when dlt had nothing to load (no new rows and no state change): there
    is no load package then, and naming the previous one would point at rows this run did not
    write. ``cursor_before``/``cursor_after`` are null while a resource has no cursor.
    """
    rows_loaded = dlt_metadata.get("rows_loaded")
    if isinstance(rows_loaded, dg.IntMetadataValue):
        rows_loaded = rows_loaded.value
    metadata: dict[str, Any] = {
        k: v for k, v in dlt_metadata.items() if k not in _DLT_KEYS_DROPPED and v is not None
    }
    if "dagster/column_schema" not in metadata:
        # dagster-dlt omits it for a table dlt's schema does not know yet: use the contract's.
        # Imported here: crm_assets.assets imports this module.
        from crm_assets.assets import contract_table_schema

        metadata["dagster/column_schema"] = contract_table_schema(RESOURCES_BY_NAME[resource])
    metadata.update(
        {
            # dlt leaves rows_loaded out of empty loads: 0 rows is a valid, plotted result.
            "rows_loaded": dg.MetadataValue.int(int(rows_loaded or 0)),
            "records_read": dg.MetadataValue.int(stats.unique_records),
            "api_total": dg.MetadataValue.int(stats.api_total or 0),
            "rejected_records": dg.MetadataValue.int(rejected),
            "pages": dg.MetadataValue.int(stats.pages),
            "http_requests": dg.MetadataValue.int(stats.http_attempts),
            "retries": dg.MetadataValue.int(stats.retries),
            "read_passes": dg.MetadataValue.int(stats.passes),
            "duration_s": dg.MetadataValue.float(round(duration_s, 3)),
            "sync_mode": dg.MetadataValue.text(plan.mode),
            "sync_mode_reason": dg.MetadataValue.text(plan.reason),
            "trigger": dg.MetadataValue.text(trigger),
            "cursor_before": _text_or_null(cursor_before),
            "cursor_after": _text_or_null(cursor_after),
            "load_id": _text_or_null(load_id),
            "new_columns": dg.MetadataValue.text(", ".join(new_columns)),
        }
    )
    if row_count is not None:
        metadata["dagster/row_count"] = dg.MetadataValue.int(row_count)
    return metadata


def new_columns_of(pipeline: Any, resource: CrmResource) -> list[str]:
    """Columns the warehouse table has beyond the contract (new API fields), sorted."""
    try:
        columns = pipeline.default_schema.get_table_columns(resource.name)
    except Exception:  # noqa: BLE001 - no schema or table yet
        return []
    known = {c.name for c in resource.columns}
    return sorted(c for c in columns if c not in known and not c.startswith("_dlt"))


def write_rejects(context: dg.AssetExecutionContext, pipeline: Any, rejects: RejectSink) -> None:
    """Appends the run's rejected records to ``_rejected_records`` and warns about them.

    Runs right after the main load committed. Should this write fail, the run fails and its
    error names every rejected record (resource, id, reason), so none is lost silently.
    """
    rows = [r.as_row() for r in rejects.rejected]
    for record in rejects.rejected:
        context.log.warning(
            f"{record.resource}: record {record.record_id or '<no id>'} rejected "
            f"({record.reason}); kept in {REJECTED_TABLE}"
        )
    quarantine = dlt_lib.resource(
        rows,
        name=REJECTED_TABLE,
        table_name=REJECTED_TABLE,
        write_disposition="append",
        columns={
            "resource": {"data_type": "text", "nullable": False},
            "record_id": {"data_type": "text", "nullable": True},
            "reason": {"data_type": "text", "nullable": False},
            "raw_json": {"data_type": "text", "nullable": False},
            "rejected_at": {"data_type": "timestamp", "nullable": False},
        },
    )
    try:
        pipeline.run(quarantine)
    except Exception as exc:
        listed = "; ".join(
            f"{r.resource}/{r.record_id or '<no id>'}: {r.reason}" for r in rejects.rejected
        )
        raise CrmSyncError(
            f"could not store {len(rows)} rejected record(s) in {REJECTED_TABLE} ({listed})"
        ) from exc


def run_crm_sync(
    context: dg.AssetExecutionContext,
    dlt: DagsterDltResource,
    crm_api: CrmApiResource,
    warehouse: CrmWarehouseResource,
    config: CrmSyncConfig,
    settings: CrmSettings,
    translator: DagsterDltTranslator,
) -> Iterator[dg.MaterializeResult]:
    """Syncs the selected resources and yields one ``MaterializeResult`` per asset.

    Errors are raised as ``CrmSyncError`` with secrets removed and without the original chain.
    """
    redactor = crm_api.redactor()
    failure: BaseException | None = None
    with redacted_logging(redactor):
        # Results are yielded as each dlt load commits (a run may load twice: full refresh for
        # some resources, incremental for others), so a later failure cannot hide a commit.
        results = _sync(context, dlt, crm_api, warehouse, config, settings, translator)
        while True:
            try:
                result = next(results)
            except StopIteration:
                break
            except (CrmConfigurationError, CrmSyncError) as exc:
                failure = CrmSyncError(redactor.redact(str(exc)))
                break
            except Exception as exc:  # noqa: BLE001 - re-raised redacted below
                names = ", ".join(resource_name_for(k) for k in sorted(context.selected_asset_keys))
                cause = describe_failure(exc)
                headline = f"CRM sync of {names} failed"
                headline += f": {cause}." if cause else "."
                headline += (
                    " The warehouse keeps its last committed state; the next run catches up."
                )
                failure = redacted_error(exc, redactor, redactor.redact(headline))
                break
            yield result
    if failure is not None:
        # Raised outside the except block so the original exception is not attached as context.
        raise failure


def _sync(
    context: dg.AssetExecutionContext,
    dlt: DagsterDltResource,
    crm_api: CrmApiResource,
    warehouse: CrmWarehouseResource,
    config: CrmSyncConfig,
    settings: CrmSettings,
    translator: DagsterDltTranslator,
) -> Iterator[dg.MaterializeResult]:
    api_key = crm_api.require_key()
    selected: list[CrmResource] = [
        RESOURCES_BY_NAME[resource_name_for(k)] for k in sorted(context.selected_asset_keys)
    ]
    names = [r.name for r in selected]
    trigger = trigger_for_run(context.run.tags)
    missing_tags = {
        k: v
        for k, v in {SYNC_MODE_TAG: config.sync_mode, TRIGGER_TAG: trigger}.items()
        if k not in context.run.tags
    }
    if missing_tags:
        context.instance.add_run_tags(context.run_id, missing_tags)

    with warehouse.pipeline() as pipeline:
        states = warehouse.resource_states(pipeline)
        counts = warehouse.row_counts(pipeline, names)
        snapshots = [ResourceSnapshot(n, cursor_of(states.get(n)), counts.get(n)) for n in names]
        plans = {p.resource: p for p in plan_sync(config.sync_mode, snapshots)}
        for plan in plans.values():
            context.log.info(f"{plan.resource}: {plan.mode} ({plan.reason})")

        for mode in SYNC_MODES:
            group = [r for r in selected if plans[r.name].mode == mode]
            if not group:
                continue
            stats = {r.name: ResourceSyncStats(r.name) for r in group}
            rejects = RejectSink()
            source = build_crm_source(
                crm_api.source_options(settings.lookback_seconds),
                api_key,
                mode,
                group,
                session=crm_api.build_session(stats),
                stats=stats,
                log=context.log.info,
                rejects=rejects,
            )
            started = time.monotonic()
            run_kwargs: dict[str, Any] = {}
            if mode == "full_refresh":
                run_kwargs["refresh"] = "drop_resources"
            if warehouse.file_format():
                run_kwargs["loader_file_format"] = warehouse.file_format()
            events = list(
                dlt.run(
                    context=context,
                    dlt_source=source,
                    dlt_pipeline=pipeline,
                    dagster_dlt_translator=translator,
                    **run_kwargs,
                )
            )
            duration = time.monotonic() - started
            load_ids = pipeline.last_trace.last_load_info.loads_ids if pipeline.last_trace else []
            if rejects.rejected:
                write_rejects(context, pipeline, rejects)
            after_states = pipeline.state.get("sources", {}).get(source.name, {})
            after_states = after_states.get("resources", {})
            row_counts = warehouse.row_counts(pipeline, [r.name for r in group])
            for event in events:
                assert isinstance(event, dg.MaterializeResult) and event.asset_key is not None
                name = resource_name_for(event.asset_key)
                new_columns = new_columns_of(pipeline, RESOURCES_BY_NAME[name])
                if new_columns:
                    context.log.warning(
                        f"{name}: the API sent fields the contract does not list; loaded as new "
                        f"columns: {', '.join(new_columns)}"
                    )
                yield dg.MaterializeResult(
                    asset_key=event.asset_key,
                    metadata=_metadata_for(
                        name,
                        plans[name],
                        trigger,
                        stats[name],
                        event.metadata or {},
                        cursor_of(states.get(name)),
                        cursor_of(after_states.get(name)),
                        row_counts.get(name),
                        duration,
                        load_ids[-1] if load_ids else None,
                        rejects.count(name),
                        new_columns,
                    ),
                )
