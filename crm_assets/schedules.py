"""Schedules: hourly incremental and weekly (Sunday 03:00 UTC) full refresh.

Both are off by default (``DefaultScheduleStatus.STOPPED``): turn them on in the UI
(Automation) or with ``dagster schedule start``. Their crons come from settings.

Their runs carry ``crm/trigger``, ``crm/sync_mode`` and one ``crm/resource.<name>`` tag per CRM
resource (see ``crm_assets.jobs``), so the run queue never runs two syncs of one resource at once.

Environment variables: ``CRM_INCREMENTAL_CRON``, ``CRM_FULL_REFRESH_CRON``,
``CRM_SCHEDULE_TIMEZONE`` (through ``crm_assets.settings``).
"""

import dagster as dg

from crm_assets.contract import RESOURCE_NAMES
from crm_assets.jobs import crm_full_refresh_job, crm_incremental_job, resource_tags
from crm_assets.settings import CrmSettings
from crm_assets.sync import SYNC_MODE_TAG, TRIGGER_TAG


def build_schedules(settings: CrmSettings) -> list[dg.ScheduleDefinition]:
    """``crm_incremental_schedule`` and ``crm_full_refresh_schedule`` for ``settings``."""
    return [
        dg.ScheduleDefinition(
            name="crm_incremental_schedule",
            job=crm_incremental_job,
            cron_schedule=settings.incremental_cron,
            execution_timezone=settings.schedule_timezone,
            tags={
                TRIGGER_TAG: "schedule",
                SYNC_MODE_TAG: "incremental",
                **resource_tags(RESOURCE_NAMES),
            },
            description="Incremental sync of every CRM resource.",
            default_status=dg.DefaultScheduleStatus.STOPPED,
        ),
        dg.ScheduleDefinition(
            name="crm_full_refresh_schedule",
            job=crm_full_refresh_job,
            cron_schedule=settings.full_refresh_cron,
            execution_timezone=settings.schedule_timezone,
            tags={
                TRIGGER_TAG: "schedule",
                SYNC_MODE_TAG: "full_refresh",
                **resource_tags(RESOURCE_NAMES),
            },
            description="Full refresh of every CRM resource (reconciles hard deletes).",
            default_status=dg.DefaultScheduleStatus.STOPPED,
        ),
    ]
