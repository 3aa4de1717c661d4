"""crm_assets: a CRM API synced into a warehouse by dlt, as Dagster assets.

Entry points: ``crm_assets.definitions`` (Dagster), ``python -m crm_assets.sandbox`` (the local
CRM API), ``python -m crm_assets.demo`` (the end-to-end demo run).
"""
