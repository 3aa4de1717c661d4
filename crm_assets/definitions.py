"""The Dagster definitions of crm_assets (``dagster dev``, ``dagster job execute -m``).

Loading them does no I/O and needs no secret: settings come from the environment, the API key
is an ``EnvVar`` resolved when a run starts.

Environment variables: ``CRM_API_KEY`` (secret, run time only) and those listed in
``crm_assets.settings``.
"""

import dagster as dg

from crm_assets.assets import CrmDltResource, build_crm_assets
from crm_assets.checks import build_checks
from crm_assets.jobs import crm_full_refresh_job, crm_incremental_job
from crm_assets.resources import CrmApiResource, CrmWarehouseResource
from crm_assets.schedules import build_schedules
from crm_assets.sensors import build_sensors
from crm_assets.settings import CrmSettings, settings_from_env


def build_definitions(settings: CrmSettings) -> dg.Definitions:
    """All definitions for ``settings``; tests build their own with other settings."""
    checks = build_checks(settings)
    return dg.Definitions(
        assets=[build_crm_assets(settings)],
        # Checks of the selected assets run in the same run, after the materialization (jobs,
        # the UI's "Materialize", sensors' runs); see crm_assets/checks.py.
        asset_checks=checks.checks,
        jobs=[crm_incremental_job, crm_full_refresh_job],
        schedules=build_schedules(settings),
        sensors=[*build_sensors(settings), *checks.sensors],
        resources={
            "dlt": CrmDltResource(),
            "crm_api": CrmApiResource(base_url=settings.base_url, api_key=dg.EnvVar("CRM_API_KEY")),
            "warehouse": CrmWarehouseResource(
                destination=settings.destination,
                duckdb_path=settings.duckdb_path,
                dataset_name=settings.dataset_name,
                pipelines_dir=settings.pipelines_dir,
            ),
        },
    )


defs = build_definitions(settings_from_env())
