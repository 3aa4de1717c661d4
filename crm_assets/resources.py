"""Dagster resources: the CRM API (holds the secret) and the warehouse (a dlt destination).

``CrmApiResource`` is the only holder of the API key. It arrives at run time from
``dg.EnvVar("CRM_API_KEY")`` (Dagster stores the variable's *name* in run config, never the value)
and is handed to the dlt source and to the sensors' probes; nothing else reads it.

``CrmWarehouseResource`` builds the dlt pipeline for a run in a fresh temporary working directory
that is deleted afterwards: dagster-dlt wipes local state before each run anyway (the cursors live
in the destination), and nothing of a run (traces carry error messages) outlives it on local disk.

Environment variables: ``CRM_API_KEY`` (secret; read by Dagster at run time through
``dg.EnvVar``). Destination credentials other than DuckDB come from dlt's own configuration, e.g.
``DESTINATION__POSTGRES__CREDENTIALS``.
"""

import contextlib
import ipaddress
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import dlt
from dlt.common.destination import TLoaderFileFormat
from dlt.sources.helpers.requests import Client, Session
from pydantic import Field
from requests.adapters import HTTPAdapter

from crm_assets.contract import (
    CURSOR_FIELD,
    MAX_PAGE_SIZE,
    CrmResource,
    format_timestamp,
    parse_timestamp,
)
from crm_assets.pagination import ResourceSyncStats, validate_page_body
from crm_assets.redaction import Redactor, redacted_error
from crm_assets.settings import (
    DEFAULT_BASE_URL,
    DEFAULT_DATASET_NAME,
    DEFAULT_DUCKDB_PATH,
    PIPELINE_NAME,
    SOURCE_NAME,
)
from crm_assets.source import SourceOptions


class CrmConfigurationError(Exception):
    """The project is configured in a way that would fail or be unsafe; says how to fix it."""


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: str) -> None:
    """Refuses URLs that would send the key in clear text to another machine, or no URL at all."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CrmConfigurationError(
            f"CRM_BASE_URL must be an http(s) URL with a host, got {base_url!r}"
        )
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise CrmConfigurationError(
            f"CRM_BASE_URL uses plain http to {parts.hostname}: the API key would travel "
            "unencrypted, so it is not sent. Use https (plain http is allowed only to loopback)."
        )


class _CountingAdapter(HTTPAdapter):
    """Counts every HTTP attempt per resource path, retries and failed connections included."""

    def __init__(self, stats: Mapping[str, ResourceSyncStats], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._by_path = {f"/v1/{name}": s for name, s in stats.items()}

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        path = urlsplit(request.url).path.rstrip("/")
        for suffix, stats in self._by_path.items():
            if path.endswith(suffix):
                stats.count_attempt()
                break
        return super().send(request, *args, **kwargs)


class CrmApiResource(dg.ConfigurableResource):
    """The CRM API: where it is, the key, and how patiently to talk to it.

    Retry defaults are the seed's: 429, 5xx, connection errors and timeouts are retried with
    exponential backoff, at most 3 retries (``max_attempts`` 4 counts the first attempt), backoff
    factor 2 (waits 2, 4, 8 s), honouring ``Retry-After`` up to ``max_retry_delay_seconds``.
    """

    base_url: str = Field(default=DEFAULT_BASE_URL, description="CRM API base URL.")
    api_key: str = Field(description="CRM API key; set through the CRM_API_KEY env var.")
    request_timeout_seconds: float = Field(default=30.0, description="Per request timeout.")
    max_attempts: int = Field(default=4, description="HTTP attempts per request, first included.")
    backoff_factor: float = Field(default=2.0, description="Exponential backoff factor (s).")
    max_retry_delay_seconds: float = Field(
        default=60.0, description="Cap of one wait, Retry-After included."
    )
    page_size: int = Field(default=MAX_PAGE_SIZE, description="Records per page (1..100).")
    max_passes: int = Field(
        default=3, description="Re-reads allowed when records move during pagination."
    )
    progress_every_pages: int = Field(default=50, description="Log progress every N pages.")

    def redactor(self) -> Redactor:
        """A redactor for this resource's secret."""
        return Redactor([self.api_key])

    def require_key(self) -> str:
        """The API key, or a clear error naming the variable when it is empty."""
        key = (self.api_key or "").strip()
        if not key:
            raise CrmConfigurationError(
                "CRM_API_KEY is empty: set the CRM API key in the CRM_API_KEY environment "
                "variable of the Dagster code location before running a sync."
            )
        check_base_url(self.base_url)
        return key

    def build_session(self, stats: Mapping[str, ResourceSyncStats] | None = None) -> Session:
        """dlt's retrying ``requests`` session with this resource's timeouts and retry policy."""
        session = Client(
            request_timeout=self.request_timeout_seconds,
            request_max_attempts=self.max_attempts,
            request_backoff_factor=self.backoff_factor,
            request_max_retry_delay=self.max_retry_delay_seconds,
            respect_retry_after_header=True,
            raise_for_status=False,
        ).session
        if stats:
            adapter = _CountingAdapter(stats, pool_maxsize=16)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        return session

    def source_options(self, lookback_seconds: int = 0) -> SourceOptions:
        """How the dlt source reads the API."""
        return SourceOptions(
            base_url=self.base_url.rstrip("/"),
            page_size=self.page_size,
            lookback_seconds=lookback_seconds,
            max_passes=self.max_passes,
            progress_every_pages=self.progress_every_pages,
        )

    def count_changed(self, resource: CrmResource, updated_since: str | None) -> int:
        """The API's ``total`` of records changed since ``updated_since`` (one ``limit=1`` call).

        Errors are raised redacted (a connection error carries the URL with the key).
        """
        key = self.require_key()
        params: dict[str, Any] = {"api_key": key, "limit": 1, "offset": 0}
        if updated_since:
            params["updated_since"] = updated_since
        url = self.base_url.rstrip("/") + resource.path
        failure: BaseException | None = None
        try:
            response = self.build_session().get(url, params=params)
            if response.status_code in (401, 403):
                raise CrmConfigurationError(
                    f"CRM rejected the API key ({response.status_code}) for {resource.name}"
                )
            response.raise_for_status()
            return int(validate_page_body(response.content)["total"])
        except CrmConfigurationError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised below, redacted
            failure = exc
        raise redacted_error(
            failure, self.redactor(), f"probing the CRM API for {resource.name} failed"
        )


def _preferred_file_format(destination: str) -> TLoaderFileFormat | None:
    # insert_values (dlt's default for SQL destinations) builds giant INSERT statements in memory;
    # parquet streams. See docs/performance.md for the measurements.
    return "parquet" if destination == "duckdb" else None


class CrmWarehouseResource(dg.ConfigurableResource):
    """The warehouse: a dlt destination and dataset, DuckDB at ``duckdb_path`` by default."""

    destination: str = Field(default="duckdb", description="dlt destination name.")
    duckdb_path: str = Field(default=DEFAULT_DUCKDB_PATH, description="DuckDB database file.")
    dataset_name: str = Field(default=DEFAULT_DATASET_NAME, description="Dataset (schema) name.")
    pipelines_dir: str | None = Field(
        default=None, description="Parent of the per-run dlt working directories."
    )
    loader_file_format: str | None = Field(
        default=None, description="dlt loader file format; empty picks the fastest known."
    )

    def check(self) -> None:
        """Raises ``CrmConfigurationError`` for configurations dlt would trip over later."""
        if self.destination == "duckdb":
            stem = Path(self.duckdb_path).stem
            if stem.lower() == self.dataset_name.lower():
                raise CrmConfigurationError(
                    f"CRM_DUCKDB_PATH {self.duckdb_path!r} has the file name {stem!r}, the same "
                    f"as the dataset {self.dataset_name!r}: DuckDB then cannot tell the catalog "
                    "from the schema and dlt's state restore fails. Rename the file, e.g. "
                    f"{stem}_warehouse.duckdb."
                )

    def file_format(self) -> TLoaderFileFormat | None:
        """The loader file format for this destination."""
        return self.loader_file_format or _preferred_file_format(self.destination)  # type: ignore[return-value]

    def _destination(self) -> Any:
        if self.destination == "duckdb":
            path = Path(self.duckdb_path).expanduser().absolute()
            path.parent.mkdir(parents=True, exist_ok=True)
            return dlt.destinations.duckdb(credentials=str(path))
        return self.destination

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[dlt.Pipeline]:
        """A dlt pipeline in a fresh working directory, removed when the block ends."""
        self.check()
        parent = None
        if self.pipelines_dir:
            parent = Path(self.pipelines_dir).expanduser()
            parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="crm-dlt-", dir=parent) as workdir:
            yield dlt.pipeline(
                pipeline_name=PIPELINE_NAME,
                pipelines_dir=workdir,
                destination=self._destination(),
                dataset_name=self.dataset_name,
            )

    def row_counts(self, pipeline: dlt.Pipeline, tables: Sequence[str]) -> dict[str, int | None]:
        """Rows per table in the warehouse; ``None`` for a table that does not exist yet."""
        counts: dict[str, int | None] = {}
        try:
            client_cm = pipeline.sql_client()
        except Exception:  # noqa: BLE001 - no dataset yet: nothing loaded
            return dict.fromkeys(tables)
        with client_cm as client:
            for table in tables:
                qualified = client.make_qualified_table_name(table)
                try:
                    rows = client.execute_sql(f"SELECT COUNT(*) FROM {qualified}")
                    counts[table] = int(rows[0][0]) if rows else 0
                except Exception:  # noqa: BLE001 - missing table
                    counts[table] = None
        return counts

    def count_rows_since(self, pipeline: dlt.Pipeline, table: str, cursor: str) -> int:
        """Rows of ``table`` whose ``updated_at`` is at or after ``cursor`` (0 without a table)."""
        since = format_timestamp(parse_timestamp(cursor))  # validated: safe to inline
        try:
            with pipeline.sql_client() as client:
                qualified = client.make_qualified_table_name(table)
                rows = client.execute_sql(
                    f"SELECT COUNT(*) FROM {qualified} "
                    f"WHERE {CURSOR_FIELD} >= CAST('{since}' AS TIMESTAMP WITH TIME ZONE)"
                )
        except Exception:  # noqa: BLE001 - no dataset or table yet
            return 0
        return int(rows[0][0]) if rows else 0

    def resource_states(self, pipeline: dlt.Pipeline) -> dict[str, dict[str, Any]]:
        """The committed dlt resource states (cursor, full-refresh marker) from the destination."""
        try:
            pipeline.sync_destination()
        except Exception:  # noqa: BLE001 - nothing stored yet
            return {}
        sources = pipeline.state.get("sources", {})
        return dict(sources.get(SOURCE_NAME, {}).get("resources", {}))
