"""Jobs: ``crm_incremental_job`` and ``crm_full_refresh_job``, the four CRM assets each.

The sync mode is baked into each job's run config (the launchpad shows and may override it);
the job tag ``crm/sync_mode`` makes runs filterable in the UI.

Environment variables: none.
"""

from collections.abc import Mapping
from typing import Any

import dagster as dg

from crm_assets.assets import CRM_ASSETS_OP, CRM_GROUP
from crm_assets.source import SyncMode
from crm_assets.sync import SYNC_MODE_TAG

CRM_ASSET_SELECTION = dg.AssetSelection.groups(CRM_GROUP)


def run_config_for(mode: SyncMode) -> Mapping[str, Any]:
    """Run config that selects ``mode`` for the CRM assets."""
    return {"ops": {CRM_ASSETS_OP: {"config": {"sync_mode": mode}}}}


crm_incremental_job = dg.define_asset_job(
    name="crm_incremental_job",
    selection=CRM_ASSET_SELECTION,
    config=run_config_for("incremental"),
    tags={SYNC_MODE_TAG: "incremental"},
    description="Loads what changed in the CRM since each resource's cursor (merge on id).",
)

crm_full_refresh_job = dg.define_asset_job(
    name="crm_full_refresh_job",
    selection=CRM_ASSET_SELECTION,
    config=run_config_for("full_refresh"),
    tags={SYNC_MODE_TAG: "full_refresh"},
    description=(
        "Re-reads every CRM record, removes records hard-deleted in the CRM and resets the "
        "cursors. The previous tables stay until the new data is extracted and normalized."
    ),
)
