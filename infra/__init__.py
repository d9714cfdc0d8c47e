"""Starting, stopping and configuring the real services (Swift S3, MLflow server, Prefect server)."""
