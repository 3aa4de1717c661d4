"""Package metadata and dependencies of crm_assets (tool configuration lives in pyproject.toml)."""

from setuptools import find_packages, setup

setup(
    name="crm_assets",
    version="0.1.0",
    description="Dagster assets that keep a warehouse in sync with a CRM through dlt's rest_api.",
    packages=find_packages(exclude=["crm_assets_tests"]),
    python_requires=">=3.10",
    install_requires=[
        # dagster-dlt 0.29.N is released with (and pins) dagster 1.13.N: upgrade them together.
        "dagster==1.13.27",
        "dagster-webserver==1.13.27",
        "dagster-dlt==0.29.27",
        "dagster-postgres==0.29.27",
        "dlt[duckdb,parquet,postgres]>=1.31,<1.32",
        "orjson>=3.9",
        "requests>=2.31",
        # The bundled sandbox CRM API.
        "starlette>=0.40",
        "uvicorn[standard]>=0.30",
    ],
    extras_require={
        # The code location image on Kubernetes (Dockerfile): run workers launched by the
        # K8sRunLauncher load the instance, which names dagster_k8s.
        "k8s": ["dagster-k8s==0.29.27"],
        # Warehouse destinations other than DuckDB and PostgreSQL (docs/deploy.md).
        "snowflake": ["dlt[snowflake]>=1.31,<1.32"],
        "bigquery": ["dlt[bigquery]>=1.31,<1.32"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "playwright>=1.45",
            "pyyaml>=6",
        ],
    },
)
