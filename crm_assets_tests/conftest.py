"""Shared fixtures: the sandbox CRM API (a real HTTP server), an isolated warehouse and Dagster.

Every test runs in its own temporary directory with its own dlt directories and ``DAGSTER_HOME``;
the environment is restored afterwards. The API key is a random canary so that leak tests can
grep for it.

The warehouse is DuckDB (a file in ``tmp_path``) unless a test module parametrizes the
``warehouse_backend`` fixture with ``WAREHOUSE_BACKENDS``; the ``postgres`` backend then loads a
fresh PostgreSQL database created for that one test and dropped after it.

Environment variables (test configuration, never cleared by ``isolated_env``):

- ``CRM_TEST_POSTGRES_DSN``: a PostgreSQL server on loopback whose user may ``CREATE DATABASE``,
  e.g. ``postgresql://postgres@127.0.0.1:5432/test``. Without it PostgreSQL tests skip, saying so.
- ``CRM_TEST_REQUIRE_ALL``: ``1`` (CI) turns every such skip into a failure, and an unreachable
  server fails the PostgreSQL tests in any case once the DSN is set.

Every other ``CRM_*``, ``DESTINATION__*``, dlt section and Dagster variable of the caller's shell
is removed for the duration of a test so that results do not depend on the machine.

Tests that start Dagster's own processes (daemon, webserver, code server) append them to the
``managed_processes`` fixture: each runs in a process group of its own, on 127.0.0.1, and is
stopped (SIGTERM, then SIGKILL after a bounded grace) when the test ends, pass or fail.
"""

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
import duckdb
import psycopg2
import pytest
from dagster._core.storage.defs_state.base import set_defs_state_storage
from psycopg2 import sql

from crm_assets.contract import RESOURCE_NAMES
from crm_assets.definitions import build_definitions
from crm_assets.jobs import run_config_for
from crm_assets.resources import is_loopback_host
from crm_assets.sandbox import SandboxClient, SandboxServer
from crm_assets.settings import CrmSettings, settings_from_env
from crm_assets.source import SyncMode

CANARY_KEY = f"canary-{uuid.uuid4().hex}"
DEFAULT_RECORDS = {"notes": 250, "deals": 230, "accounts": 120, "calls": 301}

POSTGRES_DSN_ENV = "CRM_TEST_POSTGRES_DSN"
REQUIRE_ALL_ENV = "CRM_TEST_REQUIRE_ALL"

WarehouseBackend = Literal["duckdb", "postgres"]
T = TypeVar("T")

# For `pytest.mark.parametrize("warehouse_backend", WAREHOUSE_BACKENDS, indirect=True)`: the
# postgres case carries the `postgres` marker so `-m "not postgres"` deselects it.
WAREHOUSE_BACKENDS = [
    pytest.param("duckdb", id="duckdb"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]

# Environment variables that would make a test depend on the machine it runs on. The CRM_TEST_*
# variables configure the test run itself and must survive.
_CLEARED_PREFIXES = ("CRM_", "DESTINATION__", "RUNTIME__", "NORMALIZE__", "LOAD__", "EXTRACT__")
_CLEARED_ENV = [
    name
    for name in os.environ
    if (
        name.startswith(_CLEARED_PREFIXES)
        or name in ("DAGSTER_HOME", "DLT_DATA_DIR", "DLT_PROJECT_DIR")
    )
    and not name.startswith("CRM_TEST_")
]


def require_all() -> bool:
    """True when ``CRM_TEST_REQUIRE_ALL`` asks for every test group (CI): no skip allowed."""
    return os.environ.get(REQUIRE_ALL_ENV, "").strip() not in ("", "0", "false", "no")


def _without_password(dsn: str) -> str:
    """``dsn`` fit for an error message: the password, if any, replaced by ``***``."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = f"{parts.username}:***@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def dlt_postgres_credentials(dsn: str) -> str:
    """``dsn`` as dlt's ``DESTINATION__POSTGRES__CREDENTIALS``: with a password, always.

    dlt's ``PostgresCredentials`` refuses a DSN without a password even when the server needs
    none (trust auth, as on CI); such a server ignores the placeholder.
    """
    parts = urlsplit(dsn)
    if parts.password is not None:
        return dsn
    netloc = f"{parts.username or 'postgres'}:trust-auth-ignores-this@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class PostgresServer:
    """The PostgreSQL server of ``CRM_TEST_POSTGRES_DSN``; creates and drops test databases."""

    dsn: str

    def dsn_for(self, database: str) -> str:
        """The server's DSN with ``database`` as the database."""
        return urlunsplit(urlsplit(self.dsn)._replace(path=f"/{database}"))

    def _admin(self) -> Any:
        connection = psycopg2.connect(self.dsn, connect_timeout=10)
        # CREATE/DROP DATABASE cannot run inside a transaction block.
        connection.autocommit = True
        return connection

    def create_database(self, purpose: str = "test") -> str:
        """Creates an empty database with a unique name; returns its name."""
        name = f"crm_{purpose}_{uuid.uuid4().hex[:12]}"
        connection = self._admin()
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            connection.close()
        return name

    def drop_database(self, name: str) -> None:
        """Drops ``name``, disconnecting whoever still holds a connection to it."""
        connection = self._admin()
        try:
            with connection.cursor() as cursor:
                # FORCE (PostgreSQL 13+): a leaked connection must not leave the database behind.
                cursor.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        finally:
            connection.close()


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """The test PostgreSQL server: skips without a DSN, fails when CI requires it or it is down."""
    dsn = os.environ.get(POSTGRES_DSN_ENV, "").strip()
    if not dsn:
        reason = (
            f"PostgreSQL tests need {POSTGRES_DSN_ENV}, e.g. "
            "postgresql://postgres@127.0.0.1:5432/test (a loopback server whose user may "
            "CREATE DATABASE)"
        )
        if require_all():
            pytest.fail(f"{REQUIRE_ALL_ENV} is set but {POSTGRES_DSN_ENV} is not: {reason}")
        pytest.skip(reason)
    host = urlsplit(dsn).hostname
    if not is_loopback_host(host):
        # The fixtures create and drop databases: never do that to a server on another machine.
        pytest.fail(f"{POSTGRES_DSN_ENV} must point at a loopback server, not {host!r}")
    try:
        connection = psycopg2.connect(dsn, connect_timeout=10)
        connection.close()
    except psycopg2.Error as exc:
        # Once a DSN is given the PostgreSQL tests were asked for: an outage fails, never skips.
        pytest.fail(f"PostgreSQL at {_without_password(dsn)} is unreachable: {exc}".strip())
    return PostgresServer(dsn)


@pytest.fixture
def postgres_database_factory(
    postgres_server: PostgresServer,
) -> Iterator[Callable[[str], str]]:
    """``new(purpose) -> dsn``: fresh databases for this test, all dropped when it ends."""
    created: list[str] = []

    def new(purpose: str = "test") -> str:
        name = postgres_server.create_database(purpose)
        created.append(name)
        return postgres_server.dsn_for(name)

    yield new
    for name in reversed(created):
        postgres_server.drop_database(name)


@pytest.fixture
def postgres_database(postgres_database_factory: Callable[[str], str]) -> str:
    """The DSN of a fresh database of its own for this test (dropped afterwards)."""
    return postgres_database_factory("warehouse")


@pytest.fixture(autouse=True)
def no_stale_dagster_state_storage() -> Iterator[None]:
    """Dagster keeps the "current" definitions-state storage in a context variable that a
    disposed instance (a finished sensor context, a closed test instance) can leave behind;
    resolving definitions then fails with "undefined DagsterInstance weakref". Each test starts
    without one; instances the test enters set their own."""
    with set_defs_state_storage(None):
        yield


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
    """Runs the real Dagster definitions against the sandbox and the test's warehouse.

    The warehouse is a DuckDB file in ``tmp_path`` (``backend="duckdb"``) or a PostgreSQL database
    of the test's own (``backend="postgres"``, ``postgres_dsn``). ``query`` speaks the backend's
    SQL; tables are ``<dataset>.<resource>`` (dataset ``crm``) on both.
    """

    tmp_path: Path
    base_url: str
    instance: dg.DagsterInstance
    backend: WarehouseBackend = "duckdb"
    postgres_dsn: str | None = None
    settings: CrmSettings = field(init=False)

    def __post_init__(self) -> None:
        self.settings = settings_from_env()
        if self.settings.destination != self.backend:
            raise ValueError(
                f"CRM_DESTINATION is {self.settings.destination!r} but the harness was built "
                f"for {self.backend!r}"
            )
        if self.backend == "postgres" and not self.postgres_dsn:
            raise ValueError("the postgres backend needs postgres_dsn")

    @property
    def duckdb_path(self) -> Path:
        return Path(self.settings.duckdb_path)

    @property
    def dataset(self) -> str:
        """The warehouse dataset (schema) the CRM tables live in."""
        return self.settings.dataset_name

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

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        """Rows of ``statement`` run on the warehouse (read-only on DuckDB)."""
        if self.backend == "postgres":
            connection = psycopg2.connect(self.postgres_dsn, connect_timeout=10)
            try:
                with connection.cursor() as cursor:
                    cursor.execute(statement)
                    return [tuple(row) for row in cursor.fetchall()]
            finally:
                # Closed at once: a lingering connection would block dropping the database.
                connection.close()
        with duckdb.connect(str(self.duckdb_path), read_only=True) as con:
            return con.execute(statement).fetchall()

    def table_ids(self, resource: str) -> list[str]:
        return [r[0] for r in self.query(f"SELECT id FROM {self.dataset}.{resource} ORDER BY id")]

    def count(self, resource: str) -> int:
        return int(self.query(f"SELECT COUNT(*) FROM {self.dataset}.{resource}")[0][0])


@pytest.fixture
def isolated_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox_server: SandboxServer
) -> Path:
    """Points every setting at ``tmp_path`` and the sandbox; restores the environment after."""
    for name in _CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "dagster_home"
    home.mkdir()
    # Dagster's CLI and daemons would otherwise log (and upload) usage telemetry.
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path / "dlt"))
    monkeypatch.setenv("CRM_BASE_URL", sandbox_server.url)
    monkeypatch.setenv("CRM_API_KEY", CANARY_KEY)
    monkeypatch.setenv("CRM_DUCKDB_PATH", str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("CRM_PIPELINES_DIR", str(tmp_path / "pipelines"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def warehouse_backend(request: pytest.FixtureRequest) -> WarehouseBackend:
    """``duckdb`` unless parametrized (indirectly) with ``WAREHOUSE_BACKENDS``."""
    return getattr(request, "param", "duckdb")


@pytest.fixture
def harness(
    isolated_env: Path,
    sandbox: SandboxClient,
    sandbox_server: SandboxServer,
    warehouse_backend: WarehouseBackend,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Harness]:
    """A Harness on a fresh warehouse, the reset sandbox and a temporary Dagster instance."""
    postgres_dsn: str | None = None
    if warehouse_backend == "postgres":
        # Requested lazily so that DuckDB-only runs never need (or skip for) PostgreSQL.
        postgres_dsn = request.getfixturevalue("postgres_database")
        monkeypatch.setenv("CRM_DESTINATION", "postgres")
        # dlt's own configuration, exactly as a deployment passes it (README).
        monkeypatch.setenv(
            "DESTINATION__POSTGRES__CREDENTIALS", dlt_postgres_credentials(postgres_dsn)
        )
    with dg.instance_for_test(temp_dir=str(isolated_env / "dagster_home")) as instance:
        yield Harness(isolated_env, sandbox_server.url, instance, warehouse_backend, postgres_dsn)


# --- processes the tests start ---------------------------------------------------------------


class ManagedProcess:
    """A CLI process (Dagster's) in a session of its own, logging to a file, stopped group-wide.

    Stop it with ``terminate()`` then ``wait_stopped()`` (the ``managed_processes`` fixture does).
    """

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as sink:
            # A new session makes the process a group leader: its gRPC code server and run
            # workers stay in the group and are stopped with it.
            self.process = subprocess.Popen(
                list(argv),
                env=dict(env),
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def tail(self, chars: int = 6000) -> str:
        """The end of the process's output, for failure messages."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} (exit code {self.process.poll()}) ---\n{text[-chars:]}"

    def assert_running(self) -> None:
        """Fails with the log when the process has exited."""
        if self.process.poll() is not None:
            pytest.fail(f"{self.name} exited early\n{self.tail()}")

    def terminate(self) -> None:
        """Asks the whole group to stop (SIGTERM); ``wait_stopped`` completes the shutdown."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)

    def wait_stopped(self, grace: float = 30.0) -> None:
        """Waits up to ``grace`` seconds for the group to exit, then SIGKILLs what is left."""
        pgid = self.process.pid  # the group id of a session leader is its pid
        deadline = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(grace)
        # Children (code server, run worker) may outlive the leader's graceful exit.
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait(grace)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    processes: Sequence[ManagedProcess],
    interval: float = 0.5,
) -> T:
    """Polls ``probe`` until it returns a value; fails (with logs) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        for process in processes:
            process.assert_running()
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(p.tail() for p in processes)
            pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(interval)


@pytest.fixture
def managed_processes() -> Iterator[list[ManagedProcess]]:
    """Processes a test starts (append them); all are stopped when it ends, pass or fail."""
    started: list[ManagedProcess] = []
    yield started
    # All groups are asked first, so that their graceful shutdowns overlap.
    for process in started:
        process.terminate()
    for process in started:
        process.wait_stopped()
