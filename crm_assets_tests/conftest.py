"""Shared fixtures: the sandbox CRM API (a real HTTP server), an isolated warehouse and Dagster.

Every test runs in its own temporary directory with its own DuckDB file, dlt directories and
``DAGSTER_HOME``; the environment is restored afterwards. The API key is a random canary so that
leak tests can grep for it.
"""

import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest

from crm_assets.contract import RESOURCE_NAMES
from crm_assets.definitions import build_definitions
from crm_assets.jobs import run_config_for
from crm_assets.sandbox import SandboxClient, SandboxServer
from crm_assets.settings import CrmSettings, settings_from_env
from crm_assets.source import SyncMode

CANARY_KEY = f"canary-{uuid.uuid4().hex}"
DEFAULT_RECORDS = {"notes": 250, "deals": 230, "accounts": 120, "calls": 301}

# Environment variables that would make a test depend on the machine it runs on.
_CLEARED_ENV = [
    name
    for name in os.environ
    if name.startswith(("CRM_", "DESTINATION__", "RUNTIME__", "NORMALIZE__", "LOAD__", "EXTRACT__"))
    or name in ("DAGSTER_HOME", "DLT_DATA_DIR", "DLT_PROJECT_DIR")
]


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    """One sandbox CRM API for the session, with the canary key (reset before each use)."""
    with SandboxServer(records=DEFAULT_RECORDS, seed=7, api_key=CANARY_KEY) as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> SandboxClient:
    """The session's sandbox, reset to its generated data with no faults and an empty log."""
    sandbox_server.client.reset()
    return sandbox_server.client


@dataclass
class Harness:
    """Runs the real Dagster definitions against the sandbox and a DuckDB file in ``tmp_path``."""

    tmp_path: Path
    base_url: str
    instance: dg.DagsterInstance
    settings: CrmSettings = field(init=False)

    def __post_init__(self) -> None:
        self.settings = settings_from_env()

    @property
    def duckdb_path(self) -> Path:
        return Path(self.settings.duckdb_path)

    def definitions(self, **overrides: Any) -> dg.Definitions:
        return build_definitions(replace(self.settings, **overrides))

    def materialize(
        self,
        mode: SyncMode = "incremental",
        resources: Sequence[str] = RESOURCE_NAMES,
        tags: Mapping[str, str] | None = None,
        raise_on_error: bool = True,
        resource_overrides: Mapping[str, Any] | None = None,
    ) -> dg.ExecuteInProcessResult:
        """Materializes the selected CRM assets in ``mode`` in this process."""
        defs = self.definitions()
        selection = [dg.AssetKey(["crm", name]) for name in resources]
        resources_by_key = dict(defs.resources or {})
        resources_by_key.update(resource_overrides or {})
        return dg.materialize(
            list(defs.assets or []),
            selection=selection,
            resources=resources_by_key,
            run_config=run_config_for(mode),
            instance=self.instance,
            tags=dict(tags or {}),
            raise_on_error=raise_on_error,
        )

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with duckdb.connect(str(self.duckdb_path), read_only=True) as con:
            return con.execute(sql).fetchall()

    def table_ids(self, resource: str) -> list[str]:
        return [r[0] for r in self.query(f"SELECT id FROM crm.{resource} ORDER BY id")]

    def count(self, resource: str) -> int:
        return int(self.query(f"SELECT COUNT(*) FROM crm.{resource}")[0][0])


@pytest.fixture
def isolated_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox_server: SandboxServer
) -> Path:
    """Points every setting at ``tmp_path`` and the sandbox; restores the environment after."""
    for name in _CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path / "dlt"))
    monkeypatch.setenv("CRM_BASE_URL", sandbox_server.url)
    monkeypatch.setenv("CRM_API_KEY", CANARY_KEY)
    monkeypatch.setenv("CRM_DUCKDB_PATH", str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("CRM_PIPELINES_DIR", str(tmp_path / "pipelines"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def harness(
    isolated_env: Path, sandbox: SandboxClient, sandbox_server: SandboxServer
) -> Iterator[Harness]:
    """A Harness on a fresh warehouse, the reset sandbox and a temporary Dagster instance."""
    with dg.instance_for_test(temp_dir=str(isolated_env / "dagster_home")) as instance:
        yield Harness(isolated_env, sandbox_server.url, instance)
