-- One PostgreSQL, three databases: Airflow's (POSTGRES_DB), MLflow's and releasegate's own tables.
CREATE DATABASE mlflow;
CREATE DATABASE releasegate;
