"""The CRM assets: one ``@dlt_assets`` multi-asset, one asset per CRM resource (``crm/<name>``).

The source passed to ``@dlt_assets`` only describes the resources (it carries a placeholder
instead of the key); the real source, with the key injected by ``CrmApiResource``, is built in
the asset body for every run. No pipeline is passed at definition time: ``dlt.pipeline()``
creates a working directory and writes state on disk, and the run's pipeline is built by
``CrmWarehouseResource`` from run-time configuration anyway.

Environment variables: read through ``crm_assets.settings`` when ``build_crm_assets`` is called.
"""

# Note: no `from __future__ import annotations` here: @dlt_assets inspects the annotations of
# the decorated function at definition time.
from dataclasses import dataclass
from typing import Any, cast

import dagster as dg
from dagster_dlt import DagsterDltResource, DagsterDltTranslator, dlt_assets
from dagster_dlt.translator import DltResourceTranslatorData
from dlt import Pipeline
from dlt.common.schema import Schema

from crm_assets.contract import CrmResource, get_resource
from crm_assets.resources import CrmApiResource, CrmWarehouseResource
from crm_assets.settings import CrmSettings
from crm_assets.source import SourceOptions, build_crm_source
from crm_assets.sync import CrmSyncConfig, asset_key_for, run_crm_sync

CRM_GROUP = "crm"
CRM_ASSETS_OP = "crm_dlt_assets"
CRM_POOL = "crm_warehouse"
_PLACEHOLDER_KEY = "<injected at run time by CrmApiResource>"


class CrmDltResource(DagsterDltResource):
    """dagster-dlt's resource without its one side effect on the pipeline's schema.

    dagster-dlt 0.29.27 builds the column-schema metadata by popping ``name``, ``data_type``,
    ``nullable`` and ``unique`` out of the *live* dlt schema's column dicts, so after ``run``
    the pipeline's schema has incomplete columns (we could no longer report new API fields,
    and a second load in the same run would start from a damaged schema). It gets a copy.
    """

    def _extract_table_schema_metadata(self, table_name: str, schema: Schema) -> dg.TableSchema:
        return super()._extract_table_schema_metadata(table_name, schema.clone())


def contract_table_schema(resource: CrmResource) -> dg.TableSchema:
    """The Dagster column schema of a resource, straight from the contract."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=c.name,
                type=c.type,
                description=c.description or None,
                constraints=dg.TableColumnConstraints(nullable=c.nullable, unique=c.name == "id"),
            )
            for c in resource.columns
        ]
    )


@dataclass
class CrmDltTranslator(DagsterDltTranslator):
    """Asset specs from the contract: ``crm/<name>``, group ``crm``, no phantom upstream deps."""

    destination: str = "duckdb"
    dataset_name: str = "crm"

    def get_asset_spec(self, data: DltResourceTranslatorData) -> dg.AssetSpec:
        """The spec of the asset of one CRM resource."""
        resource = get_resource(data.resource.name)
        return dg.AssetSpec(
            key=asset_key_for(resource.name),
            group_name=CRM_GROUP,
            description=(
                f"{resource.description} Synced from the CRM API `{resource.path}` into "
                f"`{self.dataset_name}.{resource.name}` by dlt (merge on `id`)."
            ),
            kinds={"dlt", self.destination},
            deps=[],
            metadata={
                "dagster/column_schema": contract_table_schema(resource),
                "dagster/table_name": f"{self.dataset_name}.{resource.name}",
            },
        )


def build_crm_assets(settings: CrmSettings) -> dg.AssetsDefinition:
    """The CRM multi-asset for ``settings``. Builds Python objects only: no I/O, no secret."""
    translator = CrmDltTranslator(
        destination=settings.destination, dataset_name=settings.dataset_name
    )
    described_source = build_crm_source(
        SourceOptions(base_url=settings.base_url), _PLACEHOLDER_KEY, parallelized=False
    )

    @dlt_assets(
        dlt_source=described_source,
        # See the module docstring: the run's pipeline is passed to DagsterDltResource.run.
        dlt_pipeline=cast(Pipeline, None),
        name=CRM_ASSETS_OP,
        dagster_dlt_translator=translator,
        pool=CRM_POOL,
    )
    def crm_dlt_assets(
        context: dg.AssetExecutionContext,
        config: CrmSyncConfig,
        dlt: DagsterDltResource,
        crm_api: CrmApiResource,
        warehouse: CrmWarehouseResource,
    ) -> Any:
        yield from run_crm_sync(context, dlt, crm_api, warehouse, config, settings, translator)

    return crm_dlt_assets
