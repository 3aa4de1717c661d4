"""The peer: plain dlt ``rest_api`` with the seed's configuration and dlt's default settings.

The configuration is the seed's (``/v1/<resource>``, ``data`` selector, offset paginator with
limit 100, ``api_key`` in the query from ``dlt.secrets["api_key"]``, primary key ``id``, merge);
only ``base_url`` points at the sandbox. Default settings: no ``parallelized``, DuckDB's default
loader file format (``insert_values``), default buffers and workers.

Usage: ``python bench/peer.py BASE_URL DUCKDB_PATH PIPELINES_DIR`` with the API key in the
environment variable ``API_KEY`` (that is where ``dlt.secrets["api_key"]`` looks).
"""

import sys
from typing import Any

import dlt
from dlt.sources.rest_api import rest_api_source


def seed_source(base_url: str) -> Any:  # the seed's config, verbatim but for base_url
    return rest_api_source(
        {
            "client": {
                "base_url": base_url,
                "auth": {
                    "type": "api_key",
                    "name": "api_key",
                    "api_key": dlt.secrets["api_key"],
                    "location": "query",
                },
            },
            "resource_defaults": {"primary_key": "id", "write_disposition": "merge"},
            "resources": [
                {
                    "name": name,
                    "endpoint": {
                        "path": f"/v1/{name}",
                        "data_selector": "data",
                        "paginator": {"type": "offset", "limit": 100},
                    },
                }
                for name in ("notes", "deals", "accounts", "calls")
            ],
        }
    )


def main() -> int:
    base_url, duckdb_path, pipelines_dir = sys.argv[1:4]
    pipeline = dlt.pipeline(
        pipeline_name="crm_peer",
        destination=dlt.destinations.duckdb(credentials=duckdb_path),
        dataset_name="crm",
        pipelines_dir=pipelines_dir,
    )
    pipeline.run(seed_source(base_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
