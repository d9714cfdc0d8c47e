"""The registry's names for a product's models and their aliases, apart from MLflow's code, so
that a command can check a name before it loads anything heavy."""

MODEL_PREFIX = "fsad-"  # registered model of a product
CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"


def model_name(product: str) -> str:
    return MODEL_PREFIX + product
