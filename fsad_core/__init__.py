"""fsad_core: few-shot anomaly detection as a pure library (no Prefect, no MLflow).

Backbone -> contrastive fine-tuning -> scoring (Mahalanobis, patch kNN, fusion) ->
threshold calibration -> metrics. Each concept lives in its own module.
"""

__version__ = "0.1.0"
