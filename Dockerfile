# The crm_assets code location: a Dagster code server (gRPC) that the webserver and the daemon load
# the definitions from, and the image every run executes in (K8sRunLauncher). docs/deploy.md.
#
#   docker build -t registry.example.com/data/crm-assets:$(git rev-parse --short HEAD) .
#   docker build --build-arg CRM_EXTRAS=k8s,snowflake -t ... .   # another warehouse's driver
#
# Configuration is the environment at run time (README "Configuration"); the image holds no secret.
FROM python:3.11-slim-bookworm

# Extras of setup.py to install: `k8s` (dagster-k8s, needed by run pods of the K8sRunLauncher),
# and the dlt driver of a warehouse other than DuckDB/PostgreSQL (`snowflake`, `bigquery`).
ARG CRM_EXTRAS=k8s

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    CRM_PIPELINES_DIR=/tmp/crm-dlt

WORKDIR /opt/crm_assets
COPY setup.py pyproject.toml ./
COPY crm_assets ./crm_assets
RUN pip install ".[${CRM_EXTRAS}]" \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin dagster \
    && mkdir -p "${DAGSTER_HOME}" \
    && chown dagster "${DAGSTER_HOME}"

# Never root: the process only needs its temporary dlt directories and DAGSTER_HOME.
USER 10001
EXPOSE 4000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "crm_assets.definitions"]
