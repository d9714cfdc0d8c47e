"""The Prefect flows and what they share: a temporary API server, product locks, retry policies, run logs."""
