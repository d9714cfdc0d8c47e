"""Prefect flows and the `fsad` command line: thin orchestration over fsad_core, storage and MLflow."""
