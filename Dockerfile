# The one image every Airflow service of docker-compose.yaml runs: the official Airflow
# image plus the pinned requirements (dbt-postgres, Great Expectations, channel SDKs) and
# the project package.
FROM apache/airflow:3.3.2-python3.11

# Pinned dependencies first, so editing the code does not reinstall them. apache-airflow
# is pinned to the base image's own version so pip can never up- or downgrade it.
COPY --chown=airflow:0 requirements.txt /opt/retention/requirements.txt
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" \
        -r /opt/retention/requirements.txt

# The project, installed editable at AIRFLOW_HOME: `import retention` resolves to
# /opt/airflow/plugins/retention, the folder docker-compose.yaml mounts over, so the image
# runs on its own and a mounted checkout runs the mounted code. retention.config derives
# its defaults (dbt project, home) from this location too.
COPY --chown=airflow:0 pyproject.toml README.md /opt/airflow/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 dbt_project/ /opt/airflow/dbt_project/
COPY --chown=airflow:0 include/ /opt/airflow/include/
RUN pip install --no-cache-dir --no-deps -e /opt/airflow \
    && mkdir -p /opt/airflow/retention_home \
    && chmod -R g+rwX /opt/airflow/retention_home

ENV RETENTION_HOME=/opt/airflow/retention_home \
    RETENTION_DBT_PROJECT_DIR=/opt/airflow/dbt_project
