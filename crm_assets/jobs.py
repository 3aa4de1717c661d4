"""Jobs: ``crm_incremental_job`` and ``crm_full_refresh_job``, the four CRM assets each.

The sync mode is baked into each job's run config (the launchpad shows and may override it);
the job tag ``crm/sync_mode`` makes runs filterable in the UI.

Every run the project creates (these jobs, hence the schedules and ``dagster job execute``, and
the sensors' run requests) also carries one ``crm/resource.<name>`` tag per CRM resource it
syncs (``resource_tags``). A run can hold only one value per tag key and the jobs sync several
resources at once, so the resource is in the key: ``deploy/dagster.yaml`` lets one run per key be
in progress and keeps the others queued (``concurrency.runs.tag_concurrency_limits``), i.e. one
run per resource at a time.

Environment variables: none.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg

from crm_assets.assets import CRM_ASSETS_OP, CRM_GROUP
from crm_assets.contract import RESOURCE_NAMES
from crm_assets.source import SyncMode
from crm_assets.sync import SYNC_MODE_TAG

CRM_ASSET_SELECTION = dg.AssetSelection.groups(CRM_GROUP)
RESOURCE_TAG_PREFIX = "crm/resource."
RESOURCE_TAG_VALUE = "true"


def resource_tag(resource_name: str) -> str:
    """The run tag key of one CRM resource, ``crm/resource.<name>``."""
    return f"{RESOURCE_TAG_PREFIX}{resource_name}"


def resource_tags(resource_names: Iterable[str]) -> dict[str, str]:
    """Run tags naming every CRM resource a run syncs (the run queue's per-resource limits)."""
    return {resource_tag(name): RESOURCE_TAG_VALUE for name in sorted(resource_names)}


def run_config_for(mode: SyncMode) -> Mapping[str, Any]:
    """Run config that selects ``mode`` for the CRM assets."""
    return {"ops": {CRM_ASSETS_OP: {"config": {"sync_mode": mode}}}}


crm_incremental_job = dg.define_asset_job(
    name="crm_incremental_job",
    selection=CRM_ASSET_SELECTION,
    config=run_config_for("incremental"),
    tags={SYNC_MODE_TAG: "incremental", **resource_tags(RESOURCE_NAMES)},
    description="Loads what changed in the CRM since each resource's cursor (merge on id).",
)

crm_full_refresh_job = dg.define_asset_job(
    name="crm_full_refresh_job",
    selection=CRM_ASSET_SELECTION,
    config=run_config_for("full_refresh"),
    tags={SYNC_MODE_TAG: "full_refresh", **resource_tags(RESOURCE_NAMES)},
    description=(
        "Re-reads every CRM record, removes records hard-deleted in the CRM and resets the "
        "cursors. The previous tables stay until the new data is extracted and normalized."
    ),
)
