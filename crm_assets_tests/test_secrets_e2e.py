"""The API key never leaks: canary keys, real runs, and a grep of everything a run leaves behind.

Every scenario (a successful sync and failures: 401, connection refused, 500s until the retries
give up, timeouts, a malformed page) runs with DEBUG logging of urllib3, dlt, Dagster and the root
logger captured at the file-descriptor level, then greps for the key in: that output, the failure
Dagster stored (message, stack, causes), every event-log entry of the run (metadata included),
the run record (config, tags) and job snapshot, every file under the test's directory (the
Dagster instance's SQLite files and compute logs, CRM_PIPELINES_DIR, DLT_DATA_DIR, $HOME/.dlt),
and the warehouse (file bytes, every text column, dlt's compressed state). Compressed content
(gzip, zlib+base64, parquet) is expanded before grepping; ``test_leak_scan_finds_planted_keys``
proves the scan finds a key in each of those forms. A positive control in every scenario proves
the key was really on the wire: redacted URLs (``api_key=***``) show up where the raw ones would.

One test runs the real CLI, ``dagster job execute``, in a fresh process with Dagster's managed
Python loggers at DEBUG (request lines land in the event log and compute logs).
"""

import base64
import gzip
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster._serdes import serialize_value
from dlt.common.utils import compressed_b64decode

from crm_assets.contract import get_resource
from crm_assets.redaction import secret_forms
from crm_assets.resources import CrmApiResource, CrmConfigurationError
from crm_assets.sandbox import FlakyProxy, SandboxClient, SandboxServer
from crm_assets_tests.conftest import CANARY_KEY, DEFAULT_RECORDS, Harness
from crm_assets_tests.test_reliability_e2e import (
    assert_equals_api,
    crm_api,
    failure_of,
    no_dlt_telemetry,  # noqa: F401 - the autouse fixture, for this module too
    shared_instance,  # noqa: F401 - used by the harness below
    shared_instance_harness,  # noqa: F401 - the `harness` fixture, for this module too
)

REDACTED_URL = "api_key=***"

# --- the leak scan (used by the crash tests too) -------------------------------------------------

_B64_BLOB = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")


def _expansions(data: bytes) -> Iterator[bytes]:
    """``data`` and what it decompresses to (gzip, zlib, dlt's zlib+base64, parquet)."""
    yield data
    if data[:1] == b"x" and data[1:2] in (b"\x01", b"^", b"\x9c", b"\xda"):
        try:
            yield from _expansions(zlib.decompress(data))
        except zlib.error:
            pass
    if data[:2] == b"\x1f\x8b":
        try:
            yield from _expansions(gzip.decompress(data))
        except (OSError, EOFError):
            pass
    if data[:4] == b"PAR1":
        try:
            table = pq.read_table(pa.BufferReader(data))
            yield str(table.to_pylist()).encode()
        except pa.ArrowException:
            pass
    if len(data) >= 16 and set(data.strip()) <= _B64_BLOB:
        try:
            yield compressed_b64decode(data.strip().decode())
        except (ValueError, zlib.error):
            pass


def _needles(secrets: Iterable[str]) -> list[bytes]:
    return sorted({form.encode() for s in secrets for form in secret_forms(s)}, key=len)


def text_leaks(text: str | bytes, secrets: Iterable[str]) -> bool:
    """Whether any form of any secret occurs in ``text`` or in what it decompresses to."""
    data = text.encode() if isinstance(text, str) else text
    needles = _needles(secrets)
    return any(n in blob for blob in _expansions(data) for n in needles)


def _duckdb_leaks(path: Path, secrets: Iterable[str]) -> list[str]:
    found = []
    with duckdb.connect(str(path), read_only=True) as con:
        columns = con.execute(
            "SELECT table_catalog, table_schema, table_name, column_name "
            "FROM information_schema.columns WHERE data_type IN ('VARCHAR', 'JSON', 'BLOB')"
        ).fetchall()
        for catalog, schema, table, column in columns:
            values = con.execute(f'SELECT "{column}" FROM "{catalog}"."{schema}"."{table}"')
            for (value,) in values.fetchall():
                if value is not None and text_leaks(value, secrets):
                    found.append(f"{path}: {schema}.{table}.{column}")
                    break
    return found


def _sqlite_leaks(path: Path, secrets: Iterable[str]) -> list[str]:
    # SQLite stores text plainly, but values may be compressed blobs: read them all.
    found = []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in con.execute(f'SELECT * FROM "{table}"'):
                if any(isinstance(v, (str, bytes)) and text_leaks(v, secrets) for v in row if v):
                    found.append(f"{path}: table {table}")
                    break
    return found


def file_leaks(root: Path, secrets: Iterable[str]) -> list[str]:
    """Every file under ``root`` holding a secret: raw bytes, decompressed, and for DuckDB and
    SQLite files also every value of every table."""
    secrets = list(secrets)
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if text_leaks(data, secrets):
            found.append(str(path))
        if data[8:12] == b"DUCK":
            found += _duckdb_leaks(path, secrets)
        elif data[:16] == b"SQLite format 3\x00":
            found += _sqlite_leaks(path, secrets)
    return found


def instance_leaks(instance: dg.DagsterInstance, secrets: Iterable[str]) -> list[str]:
    """Runs whose record, job snapshot or event-log entries hold a secret."""
    secrets = list(secrets)
    found = []
    for run in instance.get_runs():
        if text_leaks(serialize_value(run), secrets):
            found.append(f"run {run.run_id}: record (config, tags)")
        if run.job_snapshot_id and text_leaks(
            serialize_value(instance.get_job_snapshot(run.job_snapshot_id)), secrets
        ):
            found.append(f"run {run.run_id}: job snapshot")
        for entry in instance.all_logs(run.run_id):
            if text_leaks(serialize_value(entry), secrets):
                found.append(f"run {run.run_id}: event {entry.message[:80]!r}")
    return found


# --- the CLI (used by the crash tests too) -----------------------------------------------------


def dagster_cli() -> str:
    """The ``dagster`` executable of this virtualenv."""
    return str(Path(sys.executable).with_name("dagster"))


def write_instance_yaml(home: Path) -> None:
    """A Dagster instance with telemetry off and urllib3/dlt/crm_assets logs at DEBUG in its
    event log (Dagster's managed Python loggers: request lines end up in storage, on purpose)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(
        "telemetry:\n"
        "  enabled: false\n"
        "python_logs:\n"
        "  python_log_level: DEBUG\n"
        "  managed_python_loggers: [urllib3, dlt, crm_assets]\n"
    )


def cli_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``dagster`` CLI run: the isolated test environment (sandbox URL,
    canary key, warehouse, dlt directories under ``root``), its own DAGSTER_HOME and HOME."""
    home = root / "cli_dagster_home"
    write_instance_yaml(home)
    (root / "home").mkdir(exist_ok=True)
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "HOME": str(root / "home"),
        "RUNTIME__LOG_LEVEL": "DEBUG",
        "RUNTIME__DLTHUB_TELEMETRY": "false",
        **extra,
    }


# --- in-process scenarios ---------------------------------------------------------------------


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted.

    pytest swaps ``sys.stderr`` between a test's phases; a handler bound to the one of the
    setup phase would write to a closed file during the test.
    """

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


@pytest.fixture
def debug_logs(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> Iterator[pytest.CaptureFixture[str]]:
    """DEBUG logging everywhere, written to stderr, captured at the file-descriptor level."""
    home = isolated_env / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # ~/.dlt lands under the test directory
    monkeypatch.setenv("RUNTIME__LOG_LEVEL", "DEBUG")  # dlt's own logger level
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("urllib3", "dlt", "dagster")}
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield capfd
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _refused_port() -> Iterator[int]:
    # Bound but not listening: connections are refused, and nobody else can take the port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections."""
    yield from _refused_port()


SCENARIOS: dict[str, str | None] = {
    "success": None,
    "wrong_key_401": "CRM rejected the API key (401) for notes",
    "connection_refused": "could not connect to the CRM API for notes",
    "server_errors": "CRM API answered 500 for notes at offset 100",
    "timeout": "the CRM API did not answer notes at offset 100 within the request timeout",
    "malformed_page": "invalid page for notes at offset 100: the page has no 'total' field",
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_key_never_leaks(
    scenario: str,
    harness: Harness,
    sandbox: SandboxClient,
    debug_logs: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    refused_port: int,
) -> None:
    key = CANARY_KEY
    base_url = harness.base_url
    timeout = 5.0
    if scenario == "wrong_key_401":
        key = f"canary-{uuid.uuid4().hex}"  # never seen by this process before
        monkeypatch.setenv("CRM_API_KEY", key)
    elif scenario == "connection_refused":
        base_url = f"http://127.0.0.1:{refused_port}"
    elif scenario == "server_errors":
        sandbox.add_fault(resource="notes", offset=100, status=500, count=10)
    elif scenario == "timeout":
        sandbox.add_fault(resource="notes", offset=100, hang_seconds=3, count=10)
        timeout = 0.3
    elif scenario == "malformed_page":
        sandbox.add_fault(resource="notes", offset=100, malformed="missing_total")
    result = harness.materialize(
        resources=["notes"],
        raise_on_error=False,
        resource_overrides=crm_api(base_url, request_timeout_seconds=timeout),
    )
    expected = SCENARIOS[scenario]
    failure = ""
    if expected is None:
        assert result.success
        assert_equals_api(harness, sandbox, "notes")
    else:
        failure = failure_of(result)
        assert expected in failure
    output = debug_logs.readouterr()
    logged = output.out + output.err
    assert "Logging error" not in logged

    secrets = {key, CANARY_KEY}
    # The positive control: the key was in URLs that were logged or raised, and came out redacted.
    assert REDACTED_URL in logged + failure
    assert "DEBUG" in logged
    assert not text_leaks(logged, secrets), "key in stdout/stderr"
    assert not text_leaks(failure, secrets), "key in the stored failure"
    # The module's instance holds the runs of every scenario so far: all of them must be clean.
    assert instance_leaks(harness.instance, secrets) == []
    assert file_leaks(Path(harness.instance.root_directory), secrets) == []
    assert file_leaks(harness.tmp_path, secrets) == []


def test_the_key_travels_only_as_the_api_key_query_parameter(
    harness: Harness, sandbox: SandboxClient
) -> None:
    # The proxy keeps the raw bytes of every request: the key must be in the request line's
    # query string as api_key, once, and nowhere else (no header, no body, no other parameter).
    with FlakyProxy(harness.base_url, drop=0) as proxy:
        result = harness.materialize(resources=["notes"], resource_overrides=crm_api(proxy.url))
        sent = proxy.sent
    assert result.success
    raw_requests = [b"GET /" + r for r in sent.split(b"GET /")[1:]]
    assert len(raw_requests) == len(sandbox.request_log("notes")) == 3
    for raw in raw_requests:
        request_line = raw.split(b"\r\n", 1)[0].decode()
        query = parse_qs(urlsplit(request_line.split(" ")[1]).query)
        assert query["api_key"] == [CANARY_KEY]
        assert raw.count(CANARY_KEY.encode()) == 1, raw


def test_sensor_probe_never_logs_the_key(
    sandbox: SandboxClient,
    sandbox_server: SandboxServer,
    debug_logs: pytest.CaptureFixture[str],
    refused_port: int,
) -> None:
    """The probe sensors and checks use (``count_changed``) outside any sync: same guarantees."""
    deals = get_resource("deals")
    ok = CrmApiResource(base_url=sandbox_server.url, api_key=CANARY_KEY)
    assert ok.count_changed(deals, None) == DEFAULT_RECORDS["deals"]

    fresh = f"canary-{uuid.uuid4().hex}"  # a key this process never protected before
    wrong = CrmApiResource(base_url=sandbox_server.url, api_key=fresh)
    with pytest.raises(CrmConfigurationError, match=r"CRM rejected the API key \(401\) for deals"):
        wrong.count_changed(deals, None)

    refused = CrmApiResource(
        base_url=f"http://127.0.0.1:{refused_port}", api_key=fresh, backoff_factor=0.01
    )
    with pytest.raises(Exception, match="probing the CRM API for deals failed") as error:
        refused.count_changed(deals, None)
    assert REDACTED_URL in str(error.value)
    assert not text_leaks(str(error.value), [fresh])
    assert error.value.__cause__ is None and error.value.__context__ is None

    output = debug_logs.readouterr()
    logged = output.out + output.err
    assert "Logging error" not in logged
    # urllib3's DEBUG request lines of the successful and the rejected probe, redacted.
    assert logged.count("GET /v1/deals?api_key=***&limit=1&offset=0 HTTP/1.1") == 2
    assert not text_leaks(logged, [fresh, CANARY_KEY])
    assert [e["status"] for e in sandbox.request_log("deals")] == [200, 401]


def test_leak_scan_finds_planted_keys(tmp_path: Path) -> None:
    """The scan must be able to fail: plant the key in every form a run could leave it in."""
    key = f"canary-{uuid.uuid4().hex}"
    planted = {
        "plain.log": f"GET /v1/notes?api_key={key}".encode(),
        "extract.jsonl.gz": gzip.compress(f'{{"url": "{key}"}}'.encode()),
        "state.b64": base64.b64encode(zlib.compress(f'{{"k": "{key}"}}'.encode())),
    }
    for name, data in planted.items():
        (tmp_path / name).write_bytes(data)
    pq.write_table(pa.table({"v": [key]}), tmp_path / "load.parquet")
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as con:
        con.execute("CREATE SCHEMA crm; CREATE TABLE crm.t (state VARCHAR)")
        blob = base64.b64encode(zlib.compress(key.encode())).decode()
        con.execute("INSERT INTO crm.t VALUES (?)", [blob])
    with sqlite3.connect(tmp_path / "runs.db") as con:
        con.execute("CREATE TABLE events (body BLOB)")
        con.execute("INSERT INTO events VALUES (?)", [zlib.compress(key.encode())])
    found = file_leaks(tmp_path, [key])
    for name in (*planted, "load.parquet"):
        assert str(tmp_path / name) in found, name
    assert any("crm.t.state" in f for f in found)
    assert any("table events" in f for f in found)
    assert file_leaks(tmp_path, [f"canary-{uuid.uuid4().hex}"]) == []


# --- the real CLI -------------------------------------------------------------------------------


def run_cli(job: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``dagster job execute -m crm_assets.definitions -j <job>`` to the end."""
    return subprocess.run(
        [dagster_cli(), "job", "execute", "-m", "crm_assets.definitions", "-j", job],
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=300,
    )


def test_cli_run_never_leaks_the_key(isolated_env: Path, sandbox: SandboxClient) -> None:
    done = run_cli("crm_incremental_job", cli_env(isolated_env))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    with dg.DagsterInstance.from_config(str(isolated_env / "cli_dagster_home")) as instance:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS
        logged = "\n".join(e.message for e in instance.all_logs(run.run_id))
        # Positive control: urllib3's request lines (the sync's and the checks' probes) reached
        # the event log at DEBUG, redacted.
        assert REDACTED_URL in logged
        assert instance_leaks(instance, [CANARY_KEY]) == []
    assert not text_leaks(output, [CANARY_KEY])
    assert file_leaks(isolated_env, [CANARY_KEY]) == []
    for name in DEFAULT_RECORDS:
        ids = [
            r[0] for r in _query(isolated_env / "warehouse.duckdb", f"SELECT id FROM crm.{name}")
        ]
        assert sorted(ids) == sorted(r["id"] for r in sandbox.records(name))


def _query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql).fetchall()
