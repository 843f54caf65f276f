#!/bin/bash
# Runs once, when the postgres service starts on an empty data volume: one server, two
# databases, each owned by its own login role.
#   airflow   - Airflow's metadata database and the Celery result backend
#   warehouse - the pipeline's data: schemas raw and ops (loader), staging and marts (dbt)
# Passwords come from the environment (.env), never from this file.
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is not set}"
: "${WAREHOUSE_DB_PASSWORD:?WAREHOUSE_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v airflow_password="$AIRFLOW_DB_PASSWORD" \
     -v warehouse_password="$WAREHOUSE_DB_PASSWORD" <<'SQL'
create role airflow login password :'airflow_password';
create database airflow owner airflow;
create role warehouse login password :'warehouse_password';
create database warehouse owner warehouse;
SQL
