"""MLflow: runs and their artifacts, the registry with its gate and verification, run reports, serving."""
