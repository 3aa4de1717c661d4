"""The Dagster UI, for real: ``dagster dev`` (webserver + daemon) on the repo's ``workspace.yaml``.

One ``dagster dev`` per module, on 127.0.0.1 and a free port, with a temporary ``DAGSTER_HOME``,
the session's sandbox CRM and a DuckDB file in a temporary directory. Runs are launched the way
the UI launches them (the GraphQL mutation behind "Materialize" and the launchpad), queued and
started by the daemon, and executed by the default multiprocess executor.

* ``test_graphql_...`` needs nothing but the webserver.
* ``test_browser_...`` drives Debian's Chromium (``/usr/bin/chromium``) with Playwright (no
  browser download) through the asset graph. It skips when Chromium or Playwright is missing,
  unless ``CRM_TEST_REQUIRE_ALL`` is set (CI): then it fails.

Environment variables:

- ``CRM_TEST_REQUIRE_ALL``: ``1`` turns the browser skip into a failure.
- ``CRM_TEST_CHROMIUM``: the Chromium binary (default ``/usr/bin/chromium``).
- ``CRM_UPDATE_SCREENSHOT``: ``1`` writes the screenshot to ``docs/asset-graph.png`` (the README's
  picture) instead of the test's temporary directory.
"""

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from crm_assets.checks import CHECK_FRESHNESS, FRESHNESS_SENSOR
from crm_assets.contract import RESOURCE_NAMES, get_resource
from crm_assets.jobs import run_config_for
from crm_assets.sandbox import SandboxServer
from crm_assets_tests.conftest import CANARY_KEY, DEFAULT_RECORDS

pytestmark = [pytest.mark.ui, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
LOCATION = "crm_assets"
REPOSITORY = "__repository__"
STARTUP_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 240.0
# What the probe of this machine kind found Chromium needs here: no sandbox as root, no GPU, no
# background connections (the network is closed; they would be refused by the dozen).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 1100}
# The caller's settings must not leak into the code location (same rule as conftest).
_CLEARED_PREFIXES = ("CRM_", "DESTINATION__", "RUNTIME__", "NORMALIZE__", "LOAD__", "EXTRACT__")
# A fast queue for the test; the rest is Dagster's defaults plus the pool limit of production.
DAGSTER_YAML = """\
telemetry:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
concurrency:
  pools:
    default_limit: 1
"""


def _require_all() -> bool:
    return os.environ.get("CRM_TEST_REQUIRE_ALL", "").strip() not in ("", "0", "false", "no")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- dagster dev ---------------------------------------------------------------------------------


class GraphQLError(AssertionError):
    """The webserver answered a GraphQL request with errors."""


@dataclass
class DagsterDev:
    """A running ``dagster dev`` and the GraphQL API the UI uses."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def __post_init__(self) -> None:
        self._http = requests.Session()
        self._http.trust_env = False  # no proxy for 127.0.0.1

    def gql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``data`` of a GraphQL request; raises with the errors if there are any."""
        response = self._http.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60
        )
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise GraphQLError(str(body["errors"]))
        return body["data"]

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the webserver's and daemon's output, for failure messages."""
        return self.log_path.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        """Closes the HTTP session."""
        self._http.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stops ``dagster dev`` and everything it started, in bounded time.

    SIGTERM to the leader is ``dagster dev``'s own Ctrl-C path (it shuts the webserver, the
    daemon and the code servers down in order); whatever outlives it in the process group (a run
    worker, say) is killed.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _wait_until_loaded(dev: DagsterDev) -> None:
    query = """{ workspaceOrError { ... on Workspace { locationEntries {
        name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if dev.process.poll() is not None:
            pytest.fail(f"dagster dev exited with {dev.process.returncode}:\n{dev.log_tail()}")
        try:
            entries = dev.gql(query)["workspaceOrError"]["locationEntries"]
        except (requests.RequestException, GraphQLError, KeyError):
            entries = []  # the webserver is still starting
        for entry in entries:
            if entry["name"] != LOCATION or entry["loadStatus"] != "LOADED":
                continue
            location = entry["locationOrLoadError"] or {}
            if location.get("__typename") == "PythonError":
                pytest.fail(f"the code location failed to load: {location['message']}")
            return
        if time.monotonic() > deadline:
            pytest.fail(f"dagster dev not ready in {STARTUP_TIMEOUT_S:g} s:\n{dev.log_tail()}")
        time.sleep(0.5)


def dagster_dev_env(home: Path, work: Path, sandbox_url: str) -> dict[str, str]:
    """The environment of ``dagster dev``: the sandbox, a warehouse and dlt dirs in ``work``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(_CLEARED_PREFIXES) and not k.startswith("CRM_TEST_"))
        and k not in ("DAGSTER_HOME", "DLT_DATA_DIR", "DLT_PROJECT_DIR")
    }
    env.update(
        DAGSTER_HOME=str(home),
        DLT_DATA_DIR=str(work / "dlt"),
        CRM_BASE_URL=sandbox_url,
        CRM_API_KEY=CANARY_KEY,
        CRM_DUCKDB_PATH=str(work / "warehouse.duckdb"),
        CRM_PIPELINES_DIR=str(work / "pipelines"),
    )
    return env


@pytest.fixture(scope="module")
def dagster_dev(
    sandbox_server: SandboxServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DagsterDev]:
    """``dagster dev -w workspace.yaml`` on 127.0.0.1, stopped (with its children) afterwards."""
    sandbox_server.client.reset()
    work = tmp_path_factory.mktemp("dagster_dev")
    home = work / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    log_path = work / "dagster_dev.log"
    port = _free_port()
    command = [
        str(Path(sys.executable).with_name("dagster")),
        *("dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=dagster_dev_env(home, work, sandbox_server.url),
            stdin=subprocess.DEVNULL,
            stdout=log,  # a file: a pipe nobody reads could fill up and block the servers
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so nothing it starts outlives it
        )
    dev = DagsterDev(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_until_loaded(dev)
        yield dev
    finally:
        dev.close()
        _stop(process)
    assert CANARY_KEY not in log_path.read_text(errors="replace"), "the API key reached a log"


# --- runs, as the UI launches them ---------------------------------------------------------------

LAUNCH = """mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
  }
}"""

RUN = """query Run($id: ID!) { runOrError(runId: $id) { ... on Run {
  status tags { key value } assetSelection { path } assetCheckSelection { assetKey { path } name }
} } }"""

ASSET = """query Asset($path: [String!]!) { assetNodeOrError(assetKey: {path: $path}) {
  ... on AssetNode {
    assetMaterializations(limit: 1) { runId metadataEntries { label __typename
      ... on IntMetadataEntry { intValue }
      ... on FloatMetadataEntry { floatValue }
      ... on TextMetadataEntry { text }
      ... on TableSchemaMetadataEntry { schema { columns { name } } } } }
    assetChecksOrError { ... on AssetChecks { checks { name
      executionForLatestMaterialization { runId status evaluation { success severity } } } } }
  } } }"""


def launch(
    dev: DagsterDev,
    job: str,
    run_config: Mapping[str, Any],
    assets: Sequence[str] | None = None,
    checks: Sequence[str] = (),
) -> str:
    """Launches a run like the UI ("Materialize" on ``assets`` with their ``checks``)."""
    selector: dict[str, Any] = {
        "repositoryLocationName": LOCATION,
        "repositoryName": REPOSITORY,
        "pipelineName": job,
    }
    if assets is not None:
        selector["assetSelection"] = [{"path": ["crm", a]} for a in assets]
        selector["assetCheckSelection"] = [
            {"assetKey": {"path": ["crm", a]}, "name": c} for a in assets for c in checks
        ]
    params = {
        "selector": selector,
        "runConfigData": run_config,
        "mode": "default",
        "executionMetadata": {"tags": []},
    }
    result = dev.gql(LAUNCH, {"params": params})["launchPipelineExecution"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return str(result["run"]["runId"])


def wait_for_run(dev: DagsterDev, run_id: str) -> dict[str, Any]:
    """The finished run; fails with the server's log if it does not succeed."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        run = dev.gql(RUN, {"id": run_id})["runOrError"]
        if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            assert run["status"] == "SUCCESS", dev.log_tail()
            return run
        if time.monotonic() > deadline:
            pytest.fail(f"run {run_id} still {run['status']} after {RUN_TIMEOUT_S:g} s")
        time.sleep(0.5)


def asset_node(dev: DagsterDev, resource: str) -> dict[str, Any]:
    return dev.gql(ASSET, {"path": ["crm", resource]})["assetNodeOrError"]


def check_names(dev: DagsterDev, resource: str) -> list[str]:
    return sorted(c["name"] for c in asset_node(dev, resource)["assetChecksOrError"]["checks"])


def assert_checks_passed_in(node: Mapping[str, Any], run_id: str) -> None:
    checks = node["assetChecksOrError"]["checks"]
    assert len(checks) == 5
    for check in checks:
        execution = check["executionForLatestMaterialization"]
        assert execution is not None, check["name"]
        assert (execution["runId"], execution["status"]) == (run_id, "SUCCEEDED"), check
        assert execution["evaluation"]["success"], check


# --- tests ---------------------------------------------------------------------------------------


def test_graphql_lists_definitions_and_materializes_one_asset_with_checks(
    dagster_dev: DagsterDev,
) -> None:
    dev = dagster_dev
    nodes = dev.gql("{ assetNodes { assetKey { path } groupName jobNames } }")["assetNodes"]
    assert sorted(n["assetKey"]["path"] for n in nodes) == sorted(
        ["crm", name] for name in RESOURCE_NAMES
    )
    for node in nodes:
        assert node["groupName"] == "crm"
        assert {"crm_incremental_job", "crm_full_refresh_job"} <= set(node["jobNames"])

    repository = dev.gql(
        """query Repo($selector: RepositorySelector!) { repositoryOrError(
             repositorySelector: $selector) { ... on Repository {
               jobs { name } schedules { name cronSchedule scheduleState { status } }
               sensors { name sensorState { status } } } } }""",
        {"selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}},
    )["repositoryOrError"]
    assert {"crm_incremental_job", "crm_full_refresh_job"} <= {
        j["name"] for j in repository["jobs"]
    }
    assert {
        (s["name"], s["cronSchedule"], s["scheduleState"]["status"])
        for s in repository["schedules"]
    } == {
        ("crm_incremental_schedule", "0 * * * *", "STOPPED"),
        ("crm_full_refresh_schedule", "0 3 * * 0", "STOPPED"),
    }
    assert {(s["name"], s["sensorState"]["status"]) for s in repository["sensors"]} == {
        ("crm_change_sensor", "STOPPED"),
        ("crm_drift_sensor", "STOPPED"),
        (FRESHNESS_SENSOR, "RUNNING"),
    }

    # "Materialize" on crm/deals from the launchpad with a full refresh, its checks included.
    checks = check_names(dev, "deals")
    assert len(checks) == 5
    run_id = launch(dev, "__ASSET_JOB", run_config_for("full_refresh"), ["deals"], checks)
    run = wait_for_run(dev, run_id)
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert (tags["crm/sync_mode"], tags["crm/trigger"]) == ("full_refresh", "ui")
    assert run["assetSelection"] == [{"path": ["crm", "deals"]}]
    assert {c["assetKey"]["path"][-1] for c in run["assetCheckSelection"]} == {"deals"}

    node = asset_node(dev, "deals")
    (materialization,) = node["assetMaterializations"]
    assert materialization["runId"] == run_id
    entries = {e["label"]: e for e in materialization["metadataEntries"]}
    records = DEFAULT_RECORDS["deals"]
    for label in ("rows_loaded", "records_read", "api_total", "dagster/row_count"):
        assert entries[label]["__typename"] == "IntMetadataEntry", label
        assert entries[label]["intValue"] == records, label
    assert entries["duration_s"]["__typename"] == "FloatMetadataEntry"
    assert entries["sync_mode"]["text"] == "full_refresh"
    assert entries["trigger"]["text"] == "ui"
    assert entries["load_id"]["__typename"] == "TextMetadataEntry"
    assert entries["cursor_before"]["__typename"] == "NullMetadataEntry"
    columns = [c["name"] for c in entries["dagster/column_schema"]["schema"]["columns"]]
    assert {c.name for c in get_resource("deals").columns} <= set(columns)
    assert_checks_passed_in(node, run_id)

    # The freshness sensor runs by default: the daemon's first tick evaluated the checks.
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        runs = dev.gql(
            """query Runs($filter: RunsFilter) { runsOrError(filter: $filter) { ... on Runs {
                 results { assetSelection { path } assetCheckSelection { name } } } } }""",
            {"filter": {"tags": [{"key": "dagster/sensor_name", "value": FRESHNESS_SENSOR}]}},
        )["runsOrError"]["results"]
        if runs or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert runs, f"{FRESHNESS_SENSOR} launched nothing:\n{dev.log_tail()}"
    assert runs[-1]["assetSelection"] == []  # checks only: no sync, no resource "busy"
    assert [c["name"] for c in runs[-1]["assetCheckSelection"]] == [CHECK_FRESHNESS] * 4


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium binary, or a skip (a failure when CI requires every test).

    Module-scoped and requested before ``dagster_dev``, so pytest resolves it first: a machine
    without a browser skips without starting ``dagster dev`` for nothing.
    """
    path = os.environ.get("CRM_TEST_CHROMIUM", "/usr/bin/chromium")
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        path = shutil.which("chromium") or ""
    problem = None
    if not path:
        problem = "no Chromium (Debian: apt-get install chromium; or set CRM_TEST_CHROMIUM)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the Python package playwright is missing (pip install -e '.[dev]')"
    if problem is None:
        return path
    if _require_all():
        pytest.fail(f"CRM_TEST_REQUIRE_ALL is set but the browser test cannot run: {problem}")
    pytest.skip(problem)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return int(width), int(height)


def test_browser_shows_the_asset_graph_after_the_incremental_job(
    chromium: str, dagster_dev: DagsterDev, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    dev = dagster_dev
    # crm_incremental_job from its launchpad: every asset and, in the same run, its checks. The
    # launchpad's in-process executor saves a Python process per step; the default
    # multiprocess executor is what the test above runs.
    run_config = {**run_config_for("incremental"), "execution": {"config": {"in_process": {}}}}
    run_id = launch(dev, "crm_incremental_job", run_config)
    wait_for_run(dev, run_id)
    for name in RESOURCE_NAMES:
        assert_checks_passed_in(asset_node(dev, name), run_id)

    # What clicking away the first-visit "Join the community" dialog records on the server.
    assert dev.gql("mutation { setNuxSeen }")["setNuxSeen"] is True
    if os.environ.get("CRM_UPDATE_SCREENSHOT", "").strip() == "1":
        screenshot = REPO / "docs" / "asset-graph.png"
    else:
        screenshot = tmp_path / "asset-graph.png"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh, empty profile
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport=VIEWPORT,  # type: ignore[arg-type]
        )
        try:
            page = browser.new_page()
            page.goto(f"{dev.url}/locations/{LOCATION}/asset-groups/crm", timeout=60_000)
            graph = page.locator("svg foreignObject")
            for name in RESOURCE_NAMES:
                # A node of the graph (not the sidebar's list) titled with the asset's name.
                node = graph.locator(f'[data-tooltip="{name}"]')
                expect(node).to_be_visible(timeout=60_000)
            # Each node shows its last materialization and its checks: 4 nodes, 5 of 5 passed.
            expect(graph.get_by_text("Materialized", exact=True)).to_have_count(4, timeout=60_000)
            expect(graph.get_by_text("5 / 5 Passed")).to_have_count(4, timeout=60_000)
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    assert png_size(screenshot) == (VIEWPORT["width"], VIEWPORT["height"])
