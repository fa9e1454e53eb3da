"""Airflow glue for releasegate: the deferrable waits, the release decision, and the dashboard app."""
