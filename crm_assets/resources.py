"""Dagster resources: the CRM API (holds the secret) and the warehouse (a dlt destination).

``CrmApiResource`` is the only holder of the API key. It arrives at run time from
``dg.EnvVar("CRM_API_KEY")`` (Dagster stores the variable's *name* in run config, never the value)
and is handed to the dlt source and to the sensors' and checks' probes; nothing else reads it.
Before it hands the key out it registers it with ``crm_assets.redaction.protect_secret``, so no
log record of the process can carry it from then on.

``CrmWarehouseResource`` builds the dlt pipeline for a run in a fresh temporary working directory
that is deleted afterwards: dagster-dlt wipes local state before each run anyway (the cursors live
in the destination), and nothing of a run (traces carry error messages) outlives it on local disk.

Environment variables: ``CRM_API_KEY`` (secret; read by Dagster at run time through
``dg.EnvVar``). Destination credentials other than DuckDB come from dlt's own configuration, e.g.
``DESTINATION__POSTGRES__CREDENTIALS``.
"""

import contextlib
import copy
import ipaddress
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import dagster as dg
import dlt
import requests
from dlt.common.configuration.providers import DictionaryProvider
from dlt.common.destination import TLoaderFileFormat
from dlt.destinations.exceptions import DatabaseUndefinedRelation
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
from crm_assets.pagination import ResourceSyncStats, offset_of_url, validate_page_body
from crm_assets.redaction import Redactor, protect_secret, redacted_error
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


def _stats_for_url(
    stats: Mapping[str, ResourceSyncStats], url: str | None
) -> ResourceSyncStats | None:
    """The stats of the resource whose collection ``url`` requests (``.../v1/<name>``)."""
    path = urlsplit(url or "").path.rstrip("/")
    for name, resource_stats in stats.items():
        if path.endswith(f"/v1/{name}"):
            return resource_stats
    return None


class _CountingAdapter(HTTPAdapter):
    """Counts every HTTP attempt per resource path, retries and failed connections included.

    ``send`` of the transport adapter runs once per attempt, before the connection is opened,
    so an attempt that is refused, reset or times out is counted like one that is answered.
    """

    def __init__(self, stats: Mapping[str, ResourceSyncStats], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._stats = dict(stats)

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        stats = _stats_for_url(self._stats, request.url)
        if stats is not None:
            stats.count_attempt()
        return super().send(request, *args, **kwargs)


class _RetryReporter:
    """tenacity ``before_sleep`` hook of dlt's retrying session: logs every retry it waits for.

    One line per retry: resource, offset, cause (HTTP status or the exception's class, never its
    message: that carries the URL with the key), which retry of how many, and the wait tenacity
    computed (exponential backoff, or ``Retry-After`` capped at the maximum delay).
    """

    def __init__(self, stats: Mapping[str, ResourceSyncStats], max_attempts: int) -> None:
        self._stats = dict(stats)
        self._max_retries = max_attempts - 1

    def __call__(self, retry_state: Any) -> None:  # tenacity.RetryCallState (dlt's dependency)
        request = retry_state.args[0] if retry_state.args else None
        url = getattr(request, "url", None)
        stats = _stats_for_url(self._stats, url)
        if stats is None:
            return
        outcome = retry_state.outcome
        failure = outcome.exception() if outcome is not None else None
        response = getattr(failure, "response", None)
        if response is None and outcome is not None and failure is None:
            response = outcome.result()
        if isinstance(response, requests.Response):
            cause = f"HTTP {response.status_code}"
            retry_after = response.headers.get("Retry-After")
            if retry_after:
                cause += f" (Retry-After: {retry_after[:40]})"
        else:
            cause = type(failure).__name__ if failure is not None else "no answer"
        wait = retry_state.upcoming_sleep
        stats.note(
            f"{stats.resource}: {cause} at offset {offset_of_url(url)}; retry "
            f"{retry_state.attempt_number} of {self._max_retries} in {wait:.3g}s"
        )


class CrmApiResource(dg.ConfigurableResource):
    """The CRM API: where it is, the key, and how patiently to talk to it.

    Retry defaults are the seed's: 429, 5xx, connection errors and timeouts are retried with
    exponential backoff, at most 3 retries (``max_attempts`` 4 counts the first attempt), backoff
    factor 2 (waits 2, 4, 8 s), honouring ``Retry-After`` up to ``max_retry_delay_seconds``.
    Other 4xx answers are not retried. Every request has ``request_timeout_seconds`` as its
    timeout. A sync's session counts every attempt per resource (``http_requests``/``retries``
    metadata) and logs every retry it waits for (resource, offset, cause, wait); see
    ``docs/reliability.md``.
    """

    base_url: str = Field(default=DEFAULT_BASE_URL, description="CRM API base URL.")
    api_key: str = Field(description="CRM API key; set through the CRM_API_KEY env var.")
    request_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Timeout of every HTTP request (connect and each read)."
    )
    max_attempts: int = Field(
        default=4, ge=1, description="HTTP attempts per request, the first included."
    )
    backoff_factor: float = Field(
        default=2.0, ge=0, description="Exponential backoff: waits factor * 2**(retry - 1) s."
    )
    max_retry_delay_seconds: float = Field(
        default=60.0, ge=0, description="Cap of one wait, Retry-After included."
    )
    page_size: int = Field(default=MAX_PAGE_SIZE, description="Records per page (1..100).")
    max_passes: int = Field(
        default=3, description="Re-reads allowed when records move during pagination."
    )
    progress_every_pages: int = Field(default=50, description="Log progress every N pages.")

    def redactor(self) -> Redactor:
        """A redactor for this resource's secret (also redacted from every log record from now)."""
        protect_secret(self.api_key)
        return Redactor([self.api_key])

    def require_key(self) -> str:
        """The API key, or a clear error naming the variable when it is empty.

        Every user of the key goes through here, so the key is registered for log redaction
        (``protect_secret``) before anything can log a URL that carries it.
        """
        protect_secret(self.api_key or "")
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
            # dlt wraps ``send`` with tenacity's retry; every call copies this Retrying object,
            # hook included.
            retrying = getattr(session.send, "retry", None)
            if retrying is not None:
                retrying.before_sleep = _RetryReporter(stats, self.max_attempts)
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


# --- dlt settings of a sync -------------------------------------------------------------------
# The one place where crm_assets tunes dlt; docs/performance.md has the measurements behind each
# value. They reach dlt through a config provider that answers only for this project's pipeline
# (``PIPELINE_NAME``) and only while ``CrmWarehouseResource.pipeline()`` is open: nothing is
# written to the environment. dlt consults its own providers first, so an operator overrides a
# value with dlt's pipeline-scoped form, e.g. ``CRM__NORMALIZE__WORKERS=2`` or ``[crm.normalize]``
# in .dlt/config.toml (a plain ``NORMALIZE__WORKERS`` is less specific and does not win).

# DuckDB sizes its buffer pool to 80 % of the machine's memory: the load step of a 4 x 200k full
# refresh then held ~0.8 GB. With a limit it streams (and spills to ``<db>.tmp`` if it must).
DUCKDB_GLOBAL_CONFIG: Mapping[str, Any] = {"memory_limit": "128MB"}


def _preferred_file_format(destination: str) -> TLoaderFileFormat | None:
    # insert_values (dlt's default for SQL destinations) builds giant INSERT statements in memory;
    # parquet streams. See docs/performance.md for the measurements.
    return "parquet" if destination == "duckdb" else None


def dlt_run_settings(destination: str, file_format: str | None) -> dict[str, Any]:
    """The dlt configuration of one sync into ``destination`` with ``file_format`` load files.

    Keys are dlt's configuration sections (``normalize.workers`` is ``{"normalize":
    {"workers": ...}}``).
    """
    settings: dict[str, Any] = {
        # One normalize process: worker processes are spawned under Dagster (each imports dlt
        # again) and did not pay for themselves on 2 cores, see docs/performance.md.
        "normalize": {"workers": 1},
    }
    if file_format == "parquet":
        # Parquet load files compress themselves, so this only stops dlt from gzipping the
        # intermediate extract files (written once, read once, locally, then deleted).
        settings["data_writer"] = {"disable_compression": True}
    if destination == "duckdb":
        settings["destination"] = {
            "duckdb": {"credentials": {"global_config": dict(DUCKDB_GLOBAL_CONFIG)}}
        }
        # DuckDB has one writer: dlt's default of 20 parallel load jobs only holds one buffer
        # per table at once (+50 MB peak RSS for 4 x 200k), it does not load faster.
        settings["load"] = {"workers": 1}
    return settings


class _RunSettingsProvider(DictionaryProvider):
    """dlt config provider holding ``dlt_run_settings`` per pipeline name while runs are open."""

    NAME: ClassVar[str] = "crm_assets run settings"

    @property
    def name(self) -> str:
        return self.NAME

    def open(self, pipeline_name: str, settings: Mapping[str, Any]) -> None:
        self._config_doc[pipeline_name] = copy.deepcopy(dict(settings))

    def close(self, pipeline_name: str) -> None:
        self._config_doc.pop(pipeline_name, None)


_run_settings_lock = threading.Lock()
_run_settings_provider: _RunSettingsProvider | None = None
_run_settings_users: dict[str, int] = {}


@contextlib.contextmanager
def dlt_settings_for(pipeline_name: str, settings: Mapping[str, Any]) -> Iterator[None]:
    """Within the block, dlt resolves ``settings`` for the pipeline named ``pipeline_name``."""
    global _run_settings_provider
    with _run_settings_lock:
        if _run_settings_provider is None:
            _run_settings_provider = _RunSettingsProvider()
            # Consulted after dlt's own providers (environment, toml files).
            dlt.config.register_provider(_run_settings_provider)
        _run_settings_provider.open(pipeline_name, settings)
        _run_settings_users[pipeline_name] = _run_settings_users.get(pipeline_name, 0) + 1
    try:
        yield
    finally:
        with _run_settings_lock:
            _run_settings_users[pipeline_name] -= 1
            if not _run_settings_users[pipeline_name]:
                del _run_settings_users[pipeline_name]
                _run_settings_provider.close(pipeline_name)


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
        """A dlt pipeline in a fresh working directory, removed when the block ends.

        Within the block dlt runs with ``dlt_run_settings`` (file rotation, compression,
        workers, DuckDB memory): the sync's settings apply to this pipeline only.
        """
        self.check()
        parent = None
        if self.pipelines_dir:
            parent = Path(self.pipelines_dir).expanduser()
            parent.mkdir(parents=True, exist_ok=True)
        settings = dlt_run_settings(self.destination, self.file_format())
        with (
            tempfile.TemporaryDirectory(prefix="crm-dlt-", dir=parent) as workdir,
            dlt_settings_for(PIPELINE_NAME, settings),
        ):
            yield dlt.pipeline(
                pipeline_name=PIPELINE_NAME,
                pipelines_dir=workdir,
                destination=self._destination(),
                dataset_name=self.dataset_name,
            )

    def row_counts(self, pipeline: dlt.Pipeline, tables: Sequence[str]) -> dict[str, int | None]:
        """Rows per table in the warehouse; ``None`` for a table that does not exist yet."""
        # Only a missing table means "no rows yet": any other error (a locked DuckDB file, an
        # unreachable server) must surface, or callers would decide on made-up zeros.
        counts: dict[str, int | None] = {}
        with pipeline.sql_client() as client:
            for table in tables:
                qualified = client.make_qualified_table_name(table)
                try:
                    rows = client.execute_sql(f"SELECT COUNT(*) FROM {qualified}")
                    counts[table] = int(rows[0][0]) if rows else 0
                except DatabaseUndefinedRelation:
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
        except DatabaseUndefinedRelation:  # no table yet
            return 0
        return int(rows[0][0]) if rows else 0

    def resource_states(self, pipeline: dlt.Pipeline) -> dict[str, dict[str, Any]]:
        """The committed dlt resource states (cursor, full-refresh marker) from the destination."""
        # A warehouse with nothing stored yet restores an empty state; errors propagate.
        pipeline.sync_destination()
        sources = pipeline.state.get("sources", {})
        return dict(sources.get(SOURCE_NAME, {}).get("resources", {}))
