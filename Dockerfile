# The releasegate image: Airflow's official image, the pinned requirements, the library, the DAGs and plugins.
# Every service of docker-compose.yaml but PostgreSQL, Prometheus and Grafana runs it. No key, certificate
# or secret goes into it: compose mounts deploy/secrets/ and reads .env at run time (`make secrets`).
FROM apache/airflow:3.3.2-python3.11

# Pinned, with Airflow itself held at the image's version (as Airflow's docs ask for extended images).
COPY --chown=airflow:root requirements.txt /opt/releasegate/requirements.txt
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /opt/releasegate/requirements.txt

# Editable, so the package finds include/policies and include/expectations beside it, as in a checkout.
COPY --chown=airflow:root pyproject.toml README.md /opt/releasegate/
COPY --chown=airflow:root include /opt/releasegate/include
RUN pip install --no-cache-dir --no-deps -e /opt/releasegate

COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins
ENV PYTHONPATH=/opt/airflow/plugins \
    RELEASEGATE_HOME=/opt/releasegate/home
