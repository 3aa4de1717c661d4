"""crm_assets: a CRM API synced into a warehouse by dlt, as Dagster assets.

Entry points: ``crm_assets.definitions`` (Dagster), ``python -m crm_assets.sandbox`` (the local
CRM API), ``python -m crm_assets.demo`` (the end-to-end demo run).

Environment variables: ``RUNTIME__DLTHUB_TELEMETRY`` is set to ``false`` unless already set.
"""

import os

# dlt sends anonymous usage telemetry to the internet by default; a sync must talk to the CRM and
# the warehouse only. Set RUNTIME__DLTHUB_TELEMETRY=true to opt back in.
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
