"""Airflow glue for releasegate: the deferrable analysis wait (and, later, the dashboard)."""
