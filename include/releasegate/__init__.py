"""releasegate: validate, sign, shadow, canary and promote or roll back MLflow models.

The library imports nothing from Airflow; DAG tasks are one call into it.
"""

__version__ = "0.1.0"
