"""``fsad review``: the review page served with uvicorn on the configured store and registry."""

from __future__ import annotations

import os

from flows.review.app import Review, create_app
from flows.review.auth import RateLimit, Sessions, server_token

LABELS_PER_SECOND, LABEL_BURST = 4.0, 20  # an operator labels a card in a second or two, a burst of keys aside
SIGNINS_PER_SECOND, SIGNIN_BURST = 0.2, 10  # a mistyped token now and then, not a guessing machine


def review_app(token: str, storage_url: str, tracking_uri: str) -> object:
    from flows.store.storage import open_store

    return create_app(Review(open_store(storage_url), Sessions(token), RateLimit(LABELS_PER_SECOND, LABEL_BURST),
                             RateLimit(SIGNINS_PER_SECOND, SIGNIN_BURST),
                             tracking_uri if tracking_uri.startswith(("http://", "https://")) else ""))


def serve(host: str, port: int, product: str | None) -> None:
    """Serve until stopped; a token made here is printed once."""
    import uvicorn

    from flows.mlops import tracking
    from flows.settings import load_settings
    from flows.store.storage import validate_name

    token, made = server_token(host, os.environ)
    where = f"/p/{validate_name(product, 'product name')}/queue" if product else "/"
    settings = load_settings()
    tracking.configure(settings)
    app = review_app(token, settings.storage_url, settings.tracking_uri)
    print(f"fsad review: http://{host}:{port}{where}  (store {settings.storage_url})", flush=True)
    if made:
        print(f"sign-in token (made now, printed once; set FSAD_REVIEW_TOKEN to choose one): {token}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
