"""A sitecustomize for the MLflow server processes (see sitecustomize.py); put on PYTHONPATH."""
