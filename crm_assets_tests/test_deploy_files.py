"""The deployment files, validated as far as this machine can (no Docker, no Kubernetes here).

* ``deploy/dagster.yaml`` passes Dagster's own instance schema and loads into a real
  ``DagsterInstance`` whose run queue, pool, retry and monitoring settings are the documented
  ones; its PostgreSQL storage resolves from its environment variables to a URL whose SQLAlchemy
  driver is importable. (``test_daemon_e2e`` runs the file unchanged against PostgreSQL.)
* Every run the project creates (jobs, schedules; sensors in ``test_postgres_e2e`` and
  ``test_daemon_e2e``) carries one ``crm/resource.<name>`` tag per resource, and both the instance
  file and the Helm values limit each of those tags to one run.
* ``deploy/helm/values.yaml`` uses the official chart's keys, and the instance the chart renders
  from it equals ``deploy/dagster.yaml`` (PostgreSQL storage aside, which the chart owns); secrets
  only come from Kubernetes Secrets.
* The image: the Dockerfile's command is the chart's code server command and the one the README
  and ``docs/deploy.md`` give, and it really serves the definitions (started here on loopback).
* Every environment variable the deploy files use is a row of the README's configuration table.

Environment variables: none read; tests set ``DAGSTER_PG_*`` for the instance loader.
"""

import ast
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.instance.config import PoolGranularity, dagster_instance_config
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.storage.config import pg_config
from dagster._grpc.client import DagsterGrpcClient
from dagster._grpc.types import ListRepositoriesResponse
from dagster._serdes import deserialize_value
from dagster_postgres.utils import pg_url_from_config

from crm_assets.contract import RESOURCE_NAMES
from crm_assets.definitions import build_definitions
from crm_assets.jobs import RESOURCE_TAG_VALUE, resource_tag, resource_tags
from crm_assets.settings import CrmSettings
from crm_assets_tests.conftest import ManagedProcess, free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
INSTANCE_YAML = DEPLOY / "dagster.yaml"
HELM_VALUES = DEPLOY / "helm" / "values.yaml"
DOCKERFILE = REPO / "Dockerfile"
README = REPO / "README.md"
DEPLOY_DOC = REPO / "docs" / "deploy.md"

PG_ENV = {
    "DAGSTER_PG_HOST": "dagster-db.example.com",
    "DAGSTER_PG_PORT": "6543",
    "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "s3cret",
    "DAGSTER_PG_DB": "dagster",
}
EXPECTED_TAG_LIMITS = {resource_tag(name): 1 for name in RESOURCE_NAMES}
# Project settings read from the environment (not the interpreter's or pip's).
PROJECT_ENV = re.compile(r"^(CRM_|DAGSTER_|DESTINATION__)[A-Z0-9_]+$")


def load_yaml(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path} is not a YAML mapping"
    return document


@pytest.fixture
def pg_env(monkeypatch: pytest.MonkeyPatch) -> Mapping[str, str]:
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    return PG_ENV


def tag_limits(limits: list[Mapping[str, Any]]) -> dict[str, int]:
    """``{key: limit}`` of tag concurrency limits that apply to every value of their key."""
    assert all("value" not in limit for limit in limits), limits
    return {limit["key"]: limit["limit"] for limit in limits}


# --- deploy/dagster.yaml -------------------------------------------------------------------------


def test_every_deploy_yaml_file_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert INSTANCE_YAML in files and HELM_VALUES in files
    for path in files:
        load_yaml(path)


def test_instance_yaml_passes_dagsters_schema_and_loads(
    pg_env: Mapping[str, str], tmp_path: Path
) -> None:
    config, _ = dagster_instance_config(str(DEPLOY))  # raises on any schema violation
    assert set(config["storage"]) == {"postgres"}

    # A real instance from the same file, its storage swapped for SQLite in tmp_path (no server
    # needed here; test_daemon_e2e loads the file unchanged against PostgreSQL).
    document = load_yaml(INSTANCE_YAML)
    document["storage"] = {"sqlite": {"base_dir": str(tmp_path / "storage")}}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(document))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config is not None
        limits = tag_limits(list(concurrency.run_queue_config.tag_concurrency_limits or []))
        assert limits == EXPECTED_TAG_LIMITS
        assert concurrency.pool_config.default_pool_limit == 1
        assert concurrency.pool_config.pool_granularity == PoolGranularity.OP
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        assert not instance.run_retries_retry_on_asset_or_op_failure
        monitoring = instance.run_monitoring_settings
        assert monitoring["enabled"] and monitoring["free_slots_after_run_end_seconds"] > 0


def test_instance_storage_resolves_from_env_to_an_importable_driver(
    pg_env: Mapping[str, str],
) -> None:
    raw = load_yaml(INSTANCE_YAML)["storage"]["postgres"]
    processed = process_config(resolve_to_config_type(pg_config()), raw)
    assert processed.success, processed.errors
    url = pg_url_from_config(processed.value)
    parsed = sqlalchemy.engine.make_url(url)
    assert (parsed.host, parsed.port, parsed.username, parsed.database) == (
        "dagster-db.example.com",
        6543,
        "dagster",
        "dagster",
    )
    assert parsed.password == "s3cret"
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which dagster-postgres does not
    # install: the driver the URL names must import here, as in the image.
    dialect = parsed.get_dialect()
    assert dialect.driver == "psycopg2"
    dialect.import_dbapi()


# --- run tags and limits -------------------------------------------------------------------------


def test_jobs_and_schedules_tag_every_resource_they_sync() -> None:
    defs = build_definitions(CrmSettings())
    everything = resource_tags(RESOURCE_NAMES)
    assert set(everything) == set(EXPECTED_TAG_LIMITS)
    assert set(everything.values()) == {RESOURCE_TAG_VALUE}
    for job_name in ("crm_incremental_job", "crm_full_refresh_job"):
        tags = defs.resolve_job_def(job_name).tags
        assert {k: tags[k] for k in everything} == everything, job_name
    with dg.instance_for_test() as instance:
        for schedule_name in ("crm_incremental_schedule", "crm_full_refresh_schedule"):
            schedule = defs.resolve_schedule_def(schedule_name)
            context = dg.build_schedule_context(instance=instance)
            (request,) = schedule.evaluate_tick(context).run_requests or []
            assert {k: request.tags[k] for k in everything} == everything, schedule_name


def test_resource_tags_name_exactly_the_given_resources() -> None:
    assert resource_tags(["notes", "deals"]) == {
        "crm/resource.deals": "true",
        "crm/resource.notes": "true",
    }
    assert resource_tags([]) == {}


# --- deploy/helm/values.yaml ---------------------------------------------------------------------

# Keys the chart's values schema (helm/dagster/schema, pydantic models with extra="forbid") allows
# in the objects this file sets: a typo there is a `helm install` failure.
CHART_KEYS = {
    "concurrency": {"enabled", "pools", "runs"},
    "concurrency.pools": {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    "concurrency.runs": {"maxConcurrentRuns", "tagConcurrencyLimits"},
    "tagConcurrencyLimit": {"key", "value", "limit"},
    "queuedRunCoordinator": {
        "maxConcurrentRuns",
        "tagConcurrencyLimits",
        "dequeueIntervalSeconds",
        "dequeueNumWorkers",
        "dequeueUseThreads",
        "blockOpConcurrencyLimitedRuns",
    },
    "runRetries": {"enabled", "maxRetries", "retryOnAssetOrOpFailure"},
    "postgresql": {
        "postgresqlScheme",
        "image",
        "enabled",
        "postgresqlHost",
        "postgresqlUsername",
        "postgresqlPassword",
        "postgresqlDatabase",
        "postgresqlParams",
        "service",
    },
    "userDeployment": {
        "name",
        "image",
        "port",
        "dagsterApiGrpcArgs",
        "codeServerArgs",
        "includeConfigInLaunchedRuns",
        "env",
        "envConfigMaps",
        "envSecrets",
        "annotations",
        "nodeSelector",
        "affinity",
        "tolerations",
        "podSecurityContext",
        "securityContext",
        "resources",
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "labels",
        "volumeMounts",
        "volumes",
        "schedulerName",
        "initContainers",
        "sidecarContainers",
        "deploymentStrategy",
        "serviceAccount",
    },
}


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return load_yaml(HELM_VALUES)


@pytest.fixture(scope="module")
def user_deployment(values: Mapping[str, Any]) -> dict[str, Any]:
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    return deployment


def chart_instance(values: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of dagster.yaml the chart renders from ``values`` that deploy/dagster.yaml sets.

    Mirrors the chart's templates/configmap-instance.yaml and its helpers for these sections.
    """
    postgres = values["postgresql"]
    daemon = values["dagsterDaemon"]
    queued = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    retries = daemon["runRetries"]
    monitoring = daemon["runMonitoring"]
    concurrency = values["concurrency"]
    assert concurrency["enabled"] and daemon["enabled"] and daemon["runCoordinator"]["enabled"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    return {
        "storage": {
            "postgres": {
                "postgres_db": {
                    "username": postgres["postgresqlUsername"],
                    "password": {"env": "DAGSTER_PG_PASSWORD"},
                    "hostname": postgres["postgresqlHost"],
                    "db_name": postgres["postgresqlDatabase"],
                    "port": postgres["service"]["port"],
                    "params": postgres["postgresqlParams"],
                    "scheme": postgres["postgresqlScheme"],
                }
            }
        },
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {"dequeue_interval_seconds": queued["dequeueIntervalSeconds"]},
        },
        "concurrency": {
            "runs": {
                "max_concurrent_runs": concurrency["runs"]["maxConcurrentRuns"],
                "tag_concurrency_limits": concurrency["runs"]["tagConcurrencyLimits"],
            },
            "pools": {
                "default_limit": concurrency["pools"]["defaultLimit"],
                "granularity": concurrency["pools"]["granularity"],
            },
        },
        "run_retries": {
            "enabled": retries["enabled"],
            "max_retries": retries["maxRetries"],
            "retry_on_asset_or_op_failure": retries["retryOnAssetOrOpFailure"],
        },
        "run_monitoring": {
            "enabled": monitoring["enabled"],
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
            "free_slots_after_run_end_seconds": monitoring["freeSlotsAfterRunEndSeconds"],
        },
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
    }


def test_helm_values_use_the_charts_keys(
    values: Mapping[str, Any], user_deployment: Mapping[str, Any]
) -> None:
    def check(name: str, mapping: Mapping[str, Any]) -> None:
        unknown = set(mapping) - CHART_KEYS[name]
        assert not unknown, f"{name}: keys the chart does not know: {sorted(unknown)}"

    check("concurrency", values["concurrency"])
    check("concurrency.pools", values["concurrency"]["pools"])
    check("concurrency.runs", values["concurrency"]["runs"])
    for limit in values["concurrency"]["runs"]["tagConcurrencyLimits"]:
        check("tagConcurrencyLimit", limit)
    daemon = values["dagsterDaemon"]
    check("queuedRunCoordinator", daemon["runCoordinator"]["config"]["queuedRunCoordinator"])
    check("runRetries", daemon["runRetries"])
    check("postgresql", values["postgresql"])
    check("userDeployment", user_deployment)


def test_helm_values_render_the_same_instance_as_deploy_dagster_yaml(
    values: Mapping[str, Any], pg_env: Mapping[str, str], tmp_path: Path
) -> None:
    rendered = chart_instance(values)
    instance_yaml = load_yaml(INSTANCE_YAML)
    for section in ("run_coordinator", "concurrency", "run_retries", "run_monitoring", "telemetry"):
        assert rendered[section] == instance_yaml[section], section
    assert tag_limits(rendered["concurrency"]["runs"]["tag_concurrency_limits"]) == (
        EXPECTED_TAG_LIMITS
    )
    # Same driver; the chart's password comes from its secret as DAGSTER_PG_PASSWORD.
    chart_db = rendered["storage"]["postgres"]["postgres_db"]
    assert chart_db["scheme"] == instance_yaml["storage"]["postgres"]["postgres_db"]["scheme"]
    assert values["postgresql"]["enabled"] is False  # external PostgreSQL
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["global"]["postgresqlSecretName"]
    # What the chart renders passes Dagster's own instance schema.
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(rendered))
    dagster_instance_config(str(tmp_path))


def test_helm_values_run_the_code_location_with_k8s_run_launcher_and_secrets(
    values: Mapping[str, Any], user_deployment: Mapping[str, Any]
) -> None:
    assert values["dagster-user-deployments"]["enabled"] is True
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert "k8sRunLauncher" in values["runLauncher"]["config"]
    assert user_deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    # The API key and warehouse credentials come from a Kubernetes Secret, never plain values.
    assert user_deployment["envSecrets"] and all(s["name"] for s in user_deployment["envSecrets"])
    env = user_deployment["env"]
    secrets = {"CRM_API_KEY"} | {k for k in env if k.startswith("DESTINATION__")}
    assert not secrets & set(env), "secrets must come from envSecrets"
    assert env["CRM_DESTINATION"] != "duckdb", "pods are ephemeral: a DuckDB file would vanish"


# --- the image -----------------------------------------------------------------------------------


def dockerfile_command() -> list[str]:
    """The exec-form ``CMD`` of the Dockerfile."""
    (line,) = [ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("CMD ")]
    command = json.loads(line[len("CMD ") :])
    assert isinstance(command, list) and all(isinstance(part, str) for part in command)
    return command


def setup_extras() -> dict[str, list[str]]:
    """``extras_require`` of setup.py, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


def test_image_command_is_the_charts_and_the_documented_one(
    user_deployment: Mapping[str, Any],
) -> None:
    command = dockerfile_command()
    chart_command = [
        "dagster",
        "code-server",
        "start",
        "-h",
        "0.0.0.0",
        "-p",
        str(user_deployment["port"]),
        *user_deployment["codeServerArgs"],
    ]
    assert command == chart_command
    pyproject_module = re.search(r'module_name = "([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pyproject_module and command[-2:] == ["-m", pyproject_module.group(1)]
    assert f"EXPOSE {user_deployment['port']}" in DOCKERFILE.read_text()
    text = " ".join(command)
    assert text in DEPLOY_DOC.read_text(), "docs/deploy.md must show the image's command"
    assert text in README.read_text(), "the README must show the image's command"


def test_image_installs_what_run_pods_need_and_copies_the_package() -> None:
    dockerfile = DOCKERFILE.read_text()
    default_extras = re.search(r"^ARG CRM_EXTRAS=(\S*)$", dockerfile, re.MULTILINE)
    assert default_extras, "the Dockerfile must declare ARG CRM_EXTRAS"
    extras = setup_extras()
    for extra in filter(None, default_extras.group(1).split(",")):
        assert extra in extras, f"setup.py has no extra {extra!r}"
    # dagster-k8s is released with dagster-postgres (0.29.N with dagster 1.13.N).
    (k8s_pin,) = extras["k8s"]
    setup_text = (REPO / "setup.py").read_text()
    postgres_pin = re.search(r'"dagster-postgres==([^"]+)"', setup_text)
    assert postgres_pin and k8s_pin == f"dagster-k8s=={postgres_pin.group(1)}"
    for extra in ("snowflake", "bigquery"):
        assert extra in extras, f"docs/deploy.md names the {extra} extra"
    # Everything `pip install .` needs is copied and not excluded by .dockerignore.
    copy_lines = [line.split() for line in dockerfile.splitlines() if line.startswith("COPY ")]
    copied = {source for parts in copy_lines for source in parts[1:-1]}
    assert {"setup.py", "pyproject.toml", "crm_assets"} <= copied
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()}
    assert not copied & ignored
    assert "USER root" not in dockerfile and re.search(r"^USER \S+", dockerfile, re.MULTILINE)


@pytest.fixture
def clean_process_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh container: no CRM_ setting, no key, a DAGSTER_HOME of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRM_", "DAGSTER_"))}
    home = tmp_path / "dagster_home"
    home.mkdir()
    env.update(DAGSTER_HOME=str(home), DLT_DATA_DIR=str(tmp_path / "dlt"), PYTHONUNBUFFERED="1")
    return env


def test_image_command_serves_the_definitions(
    clean_process_env: dict[str, str],
    tmp_path: Path,
    managed_processes: list[ManagedProcess],
) -> None:
    """The image's CMD, run here on loopback, serves the crm_assets repository over gRPC."""
    command = dockerfile_command()
    port = free_port()
    host_index = command.index("-h") + 1
    port_index = command.index("-p") + 1
    command[host_index], command[port_index] = "127.0.0.1", str(port)  # only 127.0.0.1 here
    command[0] = str(Path(sys.executable).with_name(command[0]))  # the venv's `dagster`
    server = ManagedProcess("code server", command, clean_process_env, tmp_path / "server.log")
    managed_processes.append(server)
    client = DagsterGrpcClient(port=port, host="127.0.0.1")

    def listing() -> ListRepositoriesResponse | None:
        try:
            response = deserialize_value(client.list_repositories())
        except Exception:  # noqa: BLE001 - not listening yet
            return None
        assert isinstance(response, ListRepositoriesResponse), response
        return response

    response = wait_for("the code server to serve", listing, 120.0, [server])
    assert [s.repository_name for s in response.repository_symbols] == ["__repository__"]


# --- configuration documented --------------------------------------------------------------------


def readme_config_variables() -> set[str]:
    """Variable names of the README's configuration table rows (``| `NAME` | ...``)."""
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_<>]*)` \|", README.read_text(), re.MULTILINE))


def dockerfile_env() -> set[str]:
    """Names the Dockerfile's ``ENV`` instructions set (build ``ARG``s are not configuration)."""
    names: set[str] = set()
    in_env = False
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("ENV "):
            in_env, stripped = True, stripped[len("ENV ") :]
        if in_env:
            names.update(re.findall(r"\b([A-Z][A-Z0-9_]+)=", stripped))
            in_env = stripped.endswith("\\")
    return names


def deploy_env_variables(values: Mapping[str, Any]) -> set[str]:
    """Project environment variables the deploy files set or read."""
    names: set[str] = set()

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if set(node) == {"env"} and isinstance(node["env"], str):
                yield node["env"]
            for child in node.values():
                yield from walk(child)
        elif isinstance(node, list):
            for child in node:
                yield from walk(child)

    names.update(walk(load_yaml(INSTANCE_YAML)))
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    names.update(deployment["env"])
    names.update(dockerfile_env())
    return {n for n in names if PROJECT_ENV.match(n)}


def test_deploy_env_variables_are_in_the_readme_configuration_table(
    values: Mapping[str, Any],
) -> None:
    documented = readme_config_variables()
    used = deploy_env_variables(values)
    assert {"DAGSTER_PG_HOST", "CRM_DESTINATION", "DAGSTER_HOME"} <= used
    # Destination credentials are documented as DESTINATION__<NAME>__CREDENTIALS.
    generic = {re.sub(r"^DESTINATION__[A-Z0-9]+__", "DESTINATION__<NAME>__", n) for n in used}
    missing = sorted(generic - documented)
    assert not missing, f"add these to the README's configuration table: {missing}"
    assert "docs/deploy.md" in README.read_text(), "the README must link docs/deploy.md"
