"""The Dagster definitions: names users rely on, cheap loading, no secret needed."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from crm_assets.assets import CRM_POOL, CrmDltTranslator
from crm_assets.contract import CRM_RESOURCES, RESOURCE_NAMES
from crm_assets.definitions import build_definitions
from crm_assets.resources import CrmConfigurationError, CrmWarehouseResource
from crm_assets.settings import CrmSettings, settings_from_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def defs() -> dg.Definitions:
    return build_definitions(CrmSettings())


def test_four_assets_in_group_crm_without_phantom_deps(defs: dg.Definitions) -> None:
    graph = defs.get_repository_def().asset_graph
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {f"crm/{name}" for name in RESOURCE_NAMES}
    for name in RESOURCE_NAMES:
        node = graph.get(dg.AssetKey(["crm", name]))
        assert node.group_name == "crm"
        assert not node.parent_keys, "the default dlt translator adds phantom upstream deps"
        assert {"dlt", "duckdb"} <= set(node.kinds)
        assert node.description and f"/v1/{name}" in node.description
        schema = node.metadata["dagster/column_schema"]
        assert [c.name for c in schema.columns] == [
            c.name for c in CRM_RESOURCES[RESOURCE_NAMES.index(name)].columns
        ]


def test_jobs_schedules_sensors_exist(defs: dg.Definitions) -> None:
    repo = defs.get_repository_def()
    assert {"crm_incremental_job", "crm_full_refresh_job"} <= set(repo.job_names)
    assert {s.name for s in repo.schedule_defs} == {
        "crm_incremental_schedule",
        "crm_full_refresh_schedule",
    }
    assert {s.name for s in repo.sensor_defs} >= {"crm_change_sensor", "crm_drift_sensor"}
    (assets_def,) = [a for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)]
    assert assets_def.op.pool == CRM_POOL


def test_definitions_load_without_key_and_without_io(tmp_path: Path) -> None:
    """Import in a clean process: no CRM_API_KEY, no file written anywhere we can see."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRM_", "DAGSTER_HOME"))}
    env.update(DLT_DATA_DIR=str(tmp_path / "dlt"), HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    code = (
        "import crm_assets.definitions as d;"
        "repo = d.defs.get_repository_def();"
        "print(sorted(k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=work,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "crm/deals" in out.stdout
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], f"definitions wrote files: {written}"


def test_api_key_is_an_env_var_reference(defs: dg.Definitions) -> None:
    crm_api = (defs.resources or {})["crm_api"]
    assert crm_api.api_key == dg.EnvVar("CRM_API_KEY")  # type: ignore[attr-defined]


def test_settings_from_env() -> None:
    settings = settings_from_env(
        {
            "CRM_BASE_URL": "https://crm.example.com/",
            "CRM_DESTINATION": "postgres",
            "CRM_LOOKBACK_SECONDS": "60",
            "CRM_FULL_REFRESH_MAX_AGE_HOURS": "",
        }
    )
    assert settings.base_url == "https://crm.example.com"
    assert settings.destination == "postgres"
    assert settings.lookback_seconds == 60
    assert settings.full_refresh_max_age_hours == 192.0
    assert settings_from_env({}).duckdb_path == "data/warehouse.duckdb"
    with pytest.raises(ValueError, match="CRM_LOOKBACK_SECONDS must be a whole number"):
        settings_from_env({"CRM_LOOKBACK_SECONDS": "soon"})


def test_duckdb_file_named_like_the_dataset_is_refused(tmp_path: Path) -> None:
    warehouse = CrmWarehouseResource(duckdb_path=str(tmp_path / "crm.duckdb"), dataset_name="crm")
    with pytest.raises(CrmConfigurationError, match="same as the dataset"):
        warehouse.check()
    CrmWarehouseResource(duckdb_path=str(tmp_path / "crm_wh.duckdb")).check()


def test_a_fifth_resource_is_one_contract_entry(tmp_path: Path) -> None:
    """Append one CrmResource to the contract before anything imports it: it becomes an asset,
    a source resource, part of both jobs and of the sensors' scope."""
    code = """
import crm_assets.contract as c
tasks = c.CrmResource("tasks", "To-dos.", (c.CrmColumn("name", "text"),
                                            c.CrmColumn("due_date", "date", nullable=True)))
c.CRM_RESOURCES = c.CRM_RESOURCES + (tasks,)
c.RESOURCES_BY_NAME = {r.name: r for r in c.CRM_RESOURCES}
c.RESOURCE_NAMES = tuple(c.RESOURCES_BY_NAME)
from crm_assets.definitions import defs
from crm_assets.source import SourceOptions, build_rest_api_config
repo = defs.get_repository_def()
job = repo.get_job("crm_full_refresh_job")
print(sorted(k.to_user_string() for k in job.asset_layer.selected_asset_keys))
config = build_rest_api_config(SourceOptions(base_url="https://x"), "k")
print([(r["name"], r["endpoint"]["path"]) for r in config["resources"]][-1])
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = out.stdout.strip().splitlines()
    assert "'crm/tasks'" in lines[0]
    assert lines[1] == "('tasks', '/v1/tasks')"


def test_translator_keys() -> None:
    translator = CrmDltTranslator(destination="postgres", dataset_name="sales")
    assert translator.destination == "postgres"
