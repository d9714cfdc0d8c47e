"""Thin orchestration over fsad_core, storage and MLflow, in rooms by concern:

- `flows.pipeline`: the Prefect flows (retraining, the nightly sweep, the upload sensor, the
  benchmark, the prefix scorer) and what runs them (servers, locks, retries, run logs);
- `flows.cli`: the `fsad` command line, its local commands and the demo; nothing else imports it;
- `flows.store`: the object store, uploads and their validation;
- `flows.mlops`: MLflow tracking, the registry with its gate and verification, run reports, serving;
- `flows.settings`: the pipeline's settings, read from the environment once;
- `flows.pyfunc`: the served model's loader, at the module path every logged model names.
"""
