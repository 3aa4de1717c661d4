"""Typed, non-secret settings of the CRM sync, read once from the environment.

Reading the environment is the only thing this module does: no file, network or database I/O,
so ``crm_assets.definitions`` stays cheap to load. Secrets are *not* settings: the CRM API key
reaches the run through ``CrmApiResource`` (``dg.EnvVar("CRM_API_KEY")``).

Environment variables (all optional; an empty value means the default):

- ``CRM_BASE_URL`` (``https://api.example.com``): the CRM API base URL.
- ``CRM_DESTINATION`` (``duckdb``): any dlt destination name (credentials via dlt's config).
- ``CRM_DUCKDB_PATH`` (``data/warehouse.duckdb``): the DuckDB file, ``duckdb`` destination only.
- ``CRM_DATASET_NAME`` (``crm``): the dataset (schema) in the warehouse.
- ``CRM_PIPELINES_DIR`` (system temp dir): parent of the per-run dlt working directories.
- ``CRM_LOOKBACK_SECONDS`` (``0``): incremental lag; each run re-reads this window.
- ``CRM_INCREMENTAL_CRON`` (``0 * * * *``): cron of ``crm_incremental_schedule``.
- ``CRM_FULL_REFRESH_CRON`` (``0 3 * * 0``): cron of ``crm_full_refresh_schedule``.
- ``CRM_SCHEDULE_TIMEZONE`` (``UTC``): timezone of both crons.
- ``CRM_FULL_REFRESH_MAX_AGE_HOURS`` (``192``): the drift sensor asks for a full refresh of a
  resource whose last one is older.
- ``CRM_SENSOR_INTERVAL_SECONDS`` (``300``): minimum interval between sensor ticks.
- ``CRM_FRESHNESS_MAX_AGE_HOURS`` (``6``): the ``freshness_check`` of every CRM asset warns
  when its last successful sync is older.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_BASE_URL = "https://api.example.com"
DEFAULT_DUCKDB_PATH = "data/warehouse.duckdb"
DEFAULT_DATASET_NAME = "crm"
PIPELINE_NAME = "crm"
SOURCE_NAME = "crm"


@dataclass(frozen=True)
class CrmSettings:
    """Non-secret settings of the CRM sync (see the module docstring for the variables)."""

    base_url: str = DEFAULT_BASE_URL
    destination: str = "duckdb"
    duckdb_path: str = DEFAULT_DUCKDB_PATH
    dataset_name: str = DEFAULT_DATASET_NAME
    pipelines_dir: str | None = None
    lookback_seconds: int = 0
    incremental_cron: str = "0 * * * *"
    full_refresh_cron: str = "0 3 * * 0"
    schedule_timezone: str = "UTC"
    full_refresh_max_age_hours: float = 192.0
    sensor_interval_seconds: int = 300
    freshness_max_age_hours: float = 6.0


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def settings_from_env(env: Mapping[str, str] | None = None) -> CrmSettings:
    """Builds ``CrmSettings`` from ``env`` (default: ``os.environ``); empty values mean default."""
    env = os.environ if env is None else env

    def text(name: str, default: str) -> str:
        return env.get(name, "").strip() or default

    return CrmSettings(
        base_url=text("CRM_BASE_URL", DEFAULT_BASE_URL).rstrip("/"),
        destination=text("CRM_DESTINATION", "duckdb"),
        duckdb_path=text("CRM_DUCKDB_PATH", DEFAULT_DUCKDB_PATH),
        dataset_name=text("CRM_DATASET_NAME", DEFAULT_DATASET_NAME),
        pipelines_dir=env.get("CRM_PIPELINES_DIR", "").strip() or None,
        lookback_seconds=_int(env, "CRM_LOOKBACK_SECONDS", 0),
        incremental_cron=text("CRM_INCREMENTAL_CRON", "0 * * * *"),
        full_refresh_cron=text("CRM_FULL_REFRESH_CRON", "0 3 * * 0"),
        schedule_timezone=text("CRM_SCHEDULE_TIMEZONE", "UTC"),
        full_refresh_max_age_hours=_float(env, "CRM_FULL_REFRESH_MAX_AGE_HOURS", 192.0),
        sensor_interval_seconds=_int(env, "CRM_SENSOR_INTERVAL_SECONDS", 300),
        freshness_max_age_hours=_float(env, "CRM_FRESHNESS_MAX_AGE_HOURS", 6.0),
    )
