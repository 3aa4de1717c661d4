"""Crash safety: SIGKILL the real ``dagster job execute`` process group mid-sync, then run again.

The run is a real CLI subprocess in its own session (``start_new_session``), so ``os.killpg``
kills it with everything it started (the step worker included), as an OOM killer or a lost node
would. Where it is killed is made deterministic by the sandbox, not by timing:

* mid-pagination: the page at offset 200 of ``calls`` hangs (``hang_seconds``); once the
  sandbox's request log shows that request, the run is provably between two pages;
* in the load step of a full refresh: a ``sitecustomize`` module (test instrumentation on
  ``PYTHONPATH``, nothing in the package) pauses dlt right after it dropped the tables, writes a
  marker file, and the test kills the run on seeing it.

After each kill: the warehouse shows nothing of the killed run (or, killed in the load step, the
state the docs promise), the next run succeeds and the warehouse equals the API with no
duplicate, and nothing the killed run left behind (its dlt working directory, the Dagster event
log with DEBUG request lines, compute logs) contains the key.
"""

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest

from crm_assets.contract import RESOURCE_NAMES
from crm_assets.sandbox import SandboxClient
from crm_assets_tests.conftest import CANARY_KEY, Harness
from crm_assets_tests.test_reliability_e2e import (
    assert_equals_api,
    metadata_of,
    no_dlt_telemetry,  # noqa: F401 - the autouse fixture, for this module too
    shared_instance,  # noqa: F401 - used by the harness above
    shared_instance_harness,  # noqa: F401 - the `harness` fixture, for this module too
    warehouse_state,
)
from crm_assets_tests.test_secrets_e2e import cli_env, dagster_cli, file_leaks

HANG_SECONDS = 120  # far longer than any test waits: the hung request is always in flight
PAUSE_HOOK = '''"""test_crash_e2e's instrumentation: pause dlt's load once it dropped tables.

Patches dlt only when (and if) a process imports it: every Python process of the run imports
this file, most of them never load anything.
"""
import importlib.abc
import os
import sys
import time

_MARKER = os.environ.get("CRM_TEST_PAUSE_AFTER_DROP")
_TARGET = "dlt.destinations.job_client_impl"


def _patch(client_class):
    drop_tables = client_class.drop_tables

    def drop_tables_then_pause(self, *tables, delete_schema=True):
        drop_tables(self, *tables, delete_schema=delete_schema)
        if not self.sql_client.dataset_name.endswith("_staging"):
            with open(_MARKER + ".tmp", "w") as marker:
                marker.write(",".join(tables))
            os.replace(_MARKER + ".tmp", _MARKER)
            time.sleep(600)

    client_class.drop_tables = drop_tables_then_pause


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module.SqlJobClientBase)

        spec.loader.exec_module = exec_and_patch
        return spec


if _MARKER:
    sys.meta_path.insert(0, _PatchOnImport())
'''


def start_cli(job: str, env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    """``dagster job execute`` in a new session (its own process group); output to files."""
    with (logs / f"{job}.out").open("wb") as out, (logs / f"{job}.err").open("wb") as err:
        return subprocess.Popen(
            [dagster_cli(), "job", "execute", "-m", "crm_assets.definitions", "-j", job],
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )


def wait_until(
    condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes], logs: Path
) -> None:
    """Polls ``condition``; fails if the run ends first. The deadline only guards against a
    hang of the test itself, it is not an assertion about speed."""
    deadline = time.monotonic() + 240
    while not condition():
        if process.poll() is not None:
            tail = b"".join(p.read_bytes()[-3000:] for p in sorted(logs.glob("*.err")))
            pytest.fail(f"the run ended (code {process.returncode}) before {what}:\n{tail!r}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


def _alive_in_group(pgid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        state, process_group = fields[0], int(fields[2])
        if process_group == pgid and state not in ("Z", "X"):
            alive.append(int(stat.parent.name))
    return alive


def kill_group(process: subprocess.Popen[bytes], duckdb_path: Path | None = None) -> None:
    """SIGKILL to the run's whole process group; returns once none of it runs any more and,
    given ``duckdb_path``, once the kernel has released the killed writer's file lock."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while _alive_in_group(process.pid):
        assert time.monotonic() < deadline, f"still alive: {_alive_in_group(process.pid)}"
        time.sleep(0.05)
    while duckdb_path is not None and duckdb_path.exists():
        try:
            duckdb.connect(str(duckdb_path), read_only=True).close()
            break
        except duckdb.IOException:
            # Seen on a loaded machine: the lock outlives the group's last /proc entry briefly.
            assert time.monotonic() < deadline, f"{duckdb_path} stays locked after the kill"
            time.sleep(0.1)


def commits(harness: Harness) -> tuple[int, int]:
    """Loads and cursor states the warehouse committed (dlt's own bookkeeping tables)."""
    loads = harness.query("SELECT COUNT(*) FROM crm._dlt_loads")[0][0]
    states = harness.query("SELECT COUNT(*) FROM crm._dlt_pipeline_state")[0][0]
    return int(loads), int(states)


def assert_no_leak_after_kill(root: Path) -> None:
    # Positive control: the killed run left its dlt working directory (extracted pages, state)
    # and an event log full of DEBUG request lines; none of it may hold the key.
    leftovers = [p for p in (root / "pipelines").rglob("*") if p.is_file()]
    assert leftovers, "the killed run should have left dlt files behind"
    assert any(p.name.endswith(".db") for p in (root / "cli_dagster_home").rglob("*"))
    assert file_leaks(root, [CANARY_KEY]) == []


def test_incremental_killed_mid_pagination_keeps_the_cursor_and_next_run_catches_up(
    harness: Harness, sandbox: SandboxClient
) -> None:
    assert harness.materialize("full_refresh").success
    before = {name: warehouse_state(harness, name) for name in RESOURCE_NAMES}
    committed = commits(harness)
    # 250 changed calls are three pages for the incremental run; the third one hangs.
    sandbox.update("calls", count=250)
    sandbox.add("deals", count=5)
    sandbox.add_fault(resource="calls", offset=200, hang_seconds=HANG_SECONDS)
    sandbox.reset_log()

    logs = harness.tmp_path
    run = start_cli("crm_incremental_job", cli_env(harness.tmp_path), logs)
    wait_until(
        lambda: any(e["fault"] for e in sandbox.request_log("calls")),
        "the run reached the hanging page",
        run,
        logs,
    )
    kill_group(run, harness.tmp_path / "warehouse.duckdb")

    calls = sandbox.request_log("calls")
    assert [e["offset"] for e in calls] == [0, 100, 200]  # killed between pages
    # Nothing of the killed run is visible: no load, no cursor moved, every table as before.
    assert commits(harness) == committed
    assert {name: warehouse_state(harness, name) for name in RESOURCE_NAMES} == before
    assert_no_leak_after_kill(harness.tmp_path)

    sandbox.clear_faults()
    result = harness.materialize("incremental")
    assert result.success
    for name in RESOURCE_NAMES:
        assert_equals_api(harness, sandbox, name)
    assert metadata_of(result, "calls")["rows_loaded"] == 250


def test_full_refresh_killed_in_its_load_step_is_healed_by_the_next_incremental(
    harness: Harness, sandbox: SandboxClient
) -> None:
    assert harness.materialize("full_refresh").success
    sandbox.update("notes", count=7)
    sandbox.delete("accounts", count=2)  # a full refresh must remove them

    hooks = harness.tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(PAUSE_HOOK)
    marker = harness.tmp_path / "dropped.txt"
    env = cli_env(
        harness.tmp_path,
        PYTHONPATH=os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p),
        CRM_TEST_PAUSE_AFTER_DROP=str(marker),
    )
    logs = harness.tmp_path
    run = start_cli("crm_full_refresh_job", env, logs)
    wait_until(marker.exists, "dlt dropped the tables in the load step", run, logs)
    kill_group(run, harness.tmp_path / "warehouse.duckdb")

    # The window the docs describe: the tables are gone, the old cursors survive.
    assert set(marker.read_text().split(",")) >= set(RESOURCE_NAMES)
    assert harness.query(
        "SELECT COUNT(*) FROM information_schema.tables "
        f"WHERE table_schema = 'crm' AND table_name IN {tuple(RESOURCE_NAMES)}"
    ) == [(0,)]
    assert commits(harness)[1] > 0
    assert_no_leak_after_kill(harness.tmp_path)

    result = harness.materialize("incremental")
    assert result.success
    for name in RESOURCE_NAMES:
        metadata = metadata_of(result, name)
        assert metadata["sync_mode"] == "full_refresh", name
        assert "interrupted full refresh" in metadata["sync_mode_reason"], name
        assert_equals_api(harness, sandbox, name)
