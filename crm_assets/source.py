"""The dlt ``rest_api`` source of the CRM, built by pure functions from the contract and settings.

``build_rest_api_config`` returns the seed's ``RESTAPIConfig`` (client ``base_url``, ``api_key``
auth in the query, ``resource_defaults`` primary key ``id`` + ``merge``, one entry per contract
resource with path ``/v1/<name>``, data selector ``data``, offset paginator limit 100 with
``total_path`` ``total``) plus what the seed leaves implicit: explicit column hints from the
contract, the ``updated_at`` cursor, page validation and shift-safe pagination.

Environment variables: none (settings and the key are arguments).
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dlt.common import jsonpath
from dlt.common.schema.typing import TColumnSchema
from dlt.extract.source import DltSource
from dlt.sources.helpers.requests import Session
from dlt.sources.rest_api import rest_api_source
from dlt.sources.rest_api.typing import EndpointResource, RESTAPIConfig

from crm_assets.contract import (
    CRM_RESOURCES,
    CURSOR_FIELD,
    MAX_PAGE_SIZE,
    PRIMARY_KEY,
    CrmColumn,
    CrmResource,
)
from crm_assets.pagination import CrmOffsetPaginator, ResourceSyncStats, make_page_validator
from crm_assets.records import RecordGate, RejectSink
from crm_assets.settings import SOURCE_NAME

SyncMode = Literal["incremental", "full_refresh"]
SYNC_MODES: tuple[SyncMode, ...] = ("incremental", "full_refresh")

# Where a page's records are, compiled once (see build_rest_api_config).
_DATA_SELECTOR = jsonpath.compile_path("data")

# The first incremental run asks for everything changed since the epoch, i.e. everything.
INITIAL_CURSOR = "1970-01-01T00:00:00Z"

_DLT_TYPES: Mapping[str, str] = {
    "text": "text",
    "timestamp": "timestamp",
    "date": "date",
    "bigint": "bigint",
    "decimal": "decimal",
    "bool": "bool",
}


def column_hint(column: CrmColumn) -> TColumnSchema:
    """The dlt column hint of one contract column (type and nullability)."""
    hint: TColumnSchema = {
        "name": column.name,
        "data_type": _DLT_TYPES[column.type],  # type: ignore[typeddict-item]
        "nullable": column.nullable,
    }
    if column.description:
        hint["description"] = column.description
    if column.name == PRIMARY_KEY:
        hint["primary_key"] = True
    if column.name == CURSOR_FIELD:
        # Re-reads put several versions of a record into one load: the newest must win the merge.
        hint["dedup_sort"] = "desc"
    return hint


def column_hints(resource: CrmResource) -> dict[str, TColumnSchema]:
    """dlt column hints for every contract column of ``resource``."""
    return {c.name: column_hint(c) for c in resource.columns}


@dataclass(frozen=True)
class SourceOptions:
    """How the source reads the API (everything but the secret and the mode)."""

    base_url: str
    page_size: int = MAX_PAGE_SIZE
    lookback_seconds: int = 0
    max_passes: int = 3
    progress_every_pages: int = 50


def build_rest_api_config(
    options: SourceOptions,
    api_key: str,
    mode: SyncMode = "incremental",
    resources: Iterable[CrmResource] = CRM_RESOURCES,
    session: Session | None = None,
    stats: Mapping[str, ResourceSyncStats] | None = None,
    log: Callable[[str], None] | None = None,
) -> RESTAPIConfig:
    """The ``RESTAPIConfig`` of the CRM for ``mode``. Pure: builds objects, does no I/O.

    Incremental sends ``updated_since={incremental.start_value}`` (dlt's cursor on
    ``updated_at``, stored in the destination with each load). Full refresh sends no
    ``updated_since`` but keeps the same cursor definition, so the cursor is reset to the newest
    ``updated_at`` the full refresh saw.
    """
    if mode not in SYNC_MODES:
        raise ValueError(f"sync mode must be one of {SYNC_MODES}, got {mode!r}")
    if not 1 <= options.page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page size must be 1..{MAX_PAGE_SIZE}, got {options.page_size}")
    client: dict[str, Any] = {
        "base_url": options.base_url,
        "auth": {"type": "api_key", "name": "api_key", "api_key": api_key, "location": "query"},
    }
    if session is not None:
        client["session"] = session
    entries: list[EndpointResource] = []
    for resource in resources:
        resource_stats = (stats or {}).get(resource.name) or ResourceSyncStats(resource.name)
        incremental: dict[str, Any] = {
            "cursor_path": CURSOR_FIELD,
            "initial_value": INITIAL_CURSOR,
        }
        if options.lookback_seconds:
            incremental["lag"] = options.lookback_seconds
        params: dict[str, Any] = {}
        if mode == "incremental":
            params["updated_since"] = "{incremental.start_value}"
        entries.append(
            {
                "name": resource.name,
                "table_name": resource.name,
                "columns": column_hints(resource),
                "endpoint": {
                    "path": resource.path,
                    "params": params,
                    # Compiled once: dlt compiles a string selector again for every page
                    # (jsonpath-ng builds a parser each time, about 1 ms of the GIL per page).
                    "data_selector": _DATA_SELECTOR,
                    "paginator": CrmOffsetPaginator(
                        resource=resource.name,
                        stats=resource_stats,
                        limit=options.page_size,
                        max_passes=options.max_passes,
                        progress_every_pages=options.progress_every_pages,
                        log=log,
                    ),
                    "incremental": incremental,  # type: ignore[typeddict-item]
                    "response_actions": [make_page_validator(resource.name)],
                },
            }
        )
    return {
        "client": client,  # type: ignore[typeddict-item]
        "resource_defaults": {"primary_key": PRIMARY_KEY, "write_disposition": "merge"},
        "resources": entries,
    }


def build_crm_source(
    options: SourceOptions,
    api_key: str,
    mode: SyncMode = "incremental",
    resources: Iterable[CrmResource] = CRM_RESOURCES,
    session: Session | None = None,
    stats: Mapping[str, ResourceSyncStats] | None = None,
    log: Callable[[str], None] | None = None,
    rejects: RejectSink | None = None,
    parallelized: bool = True,
) -> DltSource:
    """The dlt source named ``crm`` for ``mode``, its resources extracted in parallel.

    Each resource gets a ``RecordGate`` step (contract check before the cursor sees a record);
    rejected records go to ``rejects``.
    """
    resources = tuple(resources)
    config = build_rest_api_config(options, api_key, mode, resources, session, stats, log)
    source = rest_api_source(config, name=SOURCE_NAME, parallelized=parallelized)
    sink = rejects if rejects is not None else RejectSink()
    for resource in resources:
        source.resources[resource.name].add_step(
            RecordGate(resource, sink, stamp_full_refresh=mode == "full_refresh")
        )
    return source
