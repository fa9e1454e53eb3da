"""The demo: synthetic churn data (`data`), three registered model versions (`models`), traffic and the runner."""
