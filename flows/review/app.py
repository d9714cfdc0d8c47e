"""The review page's web application (Starlette, Jinja2 templates, no JavaScript framework).

Every value from a request is checked before it reaches the store: a product name by the storage
layer's name check, a card by its id in the product's own queue (never an address or a path), a
version by the registry. Labels go through the label store as `fsad label` does and actions
through `flows.mlops.control`, both in the signed-in operator's name. A fault of the store or the
registry is a one-line message on the page; a label already written stays written.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from flows.mlops import control, registry, tracking
from flows.mlops.registry import RegistryError
from flows.review.auth import RateLimit, Sessions
from flows.review.limits import BodyLimit, SecurityHeaders
from flows.review.plot import auroc_svg
from flows.review.state import product_state
from flows.store.labels import (
    DEFECT,
    GOOD,
    RETRACTED,
    LabelEntry,
    LabelError,
    add_labels,
    current_labels,
    label_history,
    read_sources,
)
from flows.store.queue import drawn, picture_key, queue_state
from flows.store.records import checked_text
from flows.store.storage import ObjectNotFound, StorageError, Store, list_products, validate_name

COOKIE = "fsad_review"
PRE_SESSION = "fsad_review_signin"  # a signed-out browser's nonce, from which the sign-in form's CSRF token is made
GRID = 24  # cards of the grid view
HERE = Path(__file__).parent


@dataclass
class Review:
    """What the page serves from, and who may use it."""

    store: Store
    sessions: Sessions
    labels_rate: RateLimit  # per operator: labels, undos and actions
    signin_rate: RateLimit  # per client address
    mlflow_url: str = ""  # a tracking server's UI to link versions to, when there is one
    known_labels: dict[str, LabelEntry] = field(default_factory=dict)  # entries read so far (never rewritten)


def create_app(review: Review) -> Starlette:
    templates = Jinja2Templates(env=Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True))
    pages = Pages(review, templates)
    routes = [
        Route("/", pages.products), Route("/signin", pages.signin_form),
        Route("/signin", pages.signin, methods=["POST"]),
        Route("/signout", pages.signout, methods=["POST"]), Route("/p/{product}", pages.product),
        Route("/p/{product}/queue", pages.queue), Route("/p/{product}/picture/{version}/{item}/{kind}", pages.picture),
        Route("/p/{product}/label", pages.label, methods=["POST"]),
        Route("/p/{product}/undo", pages.undo, methods=["POST"]),
        Route("/p/{product}/control", pages.control, methods=["POST"]),
        Route("/p/{product}/report/{version}", pages.report),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    from mlflow.exceptions import MlflowException

    faults = {kind: pages.fault for kind in (ValueError, RegistryError, StorageError, OSError, MlflowException)}
    app = Starlette(routes=routes, exception_handlers={HTTPException: pages.http_error, **faults})
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit)
    return app


SignedInHandler = Callable[["Pages", Request, str, "FormData | None"], Response]  # runs in a worker thread


def signed_in(handler: SignedInHandler) -> Callable[[Pages, Request], Any]:
    """The handler with the operator's name and, for a POST, its checked form (`Pages.checked_form`);
    without a session a page asks to sign in, a POST is refused. The handler runs in a worker
    thread: its store and registry calls block, and must not hold up the other operators' requests."""
    @functools.wraps(handler)
    async def wrapper(self: Pages, request: Request) -> Response:
        operator = self.review.sessions.operator(request.cookies.get(COOKIE))
        if operator is None:
            if request.method != "GET":
                raise HTTPException(401, "sign in first")
            return RedirectResponse(f"/signin?next={quote(request.url.path)}", 303)
        form = await self.checked_form(request, operator) if request.method == "POST" else None
        return await run_in_threadpool(handler, self, request, operator, form)
    return wrapper


class Pages:
    def __init__(self, review: Review, templates: Jinja2Templates):
        self.review, self.templates = review, templates

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        cookie = request.cookies.get(COOKIE)
        operator = self.review.sessions.operator(cookie)
        csrf = self.review.sessions.csrf(cookie) if operator and cookie else ""
        return self.templates.TemplateResponse(request, name, {"operator": operator, "csrf": csrf, **context},
                                               status_code=status)

    async def checked_form(self, request: Request, operator: str) -> FormData:
        """The form of a POST that carries the session's CSRF token, within the operator's rate."""
        form = await request.form()
        if not self.review.sessions.csrf_ok(request.cookies.get(COOKIE), str(form.get("csrf", ""))):
            raise HTTPException(403, "this form is stale or did not come from this page; reload it")
        if not self.review.labels_rate.allow(operator):
            raise HTTPException(429, "too many labels at once; wait a moment")
        return form

    # --------------------------------------------------------------------------- signing in
    async def signin_form(self, request: Request) -> Response:
        return self.signin_page(request, 200, next=_local_path(request.query_params.get("next", "/")))

    def signin_page(self, request: Request, status: int, **context: Any) -> Response:
        """The sign-in form with a CSRF token of its own, made from a nonce the browser keeps."""
        nonce = request.cookies.get(PRE_SESSION) or secrets.token_urlsafe(16)
        response = self.render(request, "signin.html", status,
                               signin_csrf=self.review.sessions.csrf(f"{PRE_SESSION}:{nonce}"), **context)
        response.set_cookie(PRE_SESSION, nonce, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    async def signin(self, request: Request) -> Response:
        if not self.review.signin_rate.allow(request.client.host if request.client else "?"):
            raise HTTPException(429, "too many sign-in attempts; wait a minute")
        form = await request.form()
        nonce = request.cookies.get(PRE_SESSION)
        if not self.review.sessions.csrf_ok(f"{PRE_SESSION}:{nonce}" if nonce else None, str(form.get("csrf", ""))):
            raise HTTPException(403, "the sign-in form is stale or did not come from this page; reload it")
        try:
            name = checked_text(str(form.get("name", "")), "your name")
        except ValueError as exc:
            return self.signin_page(request, 400, error=str(exc), next="/")
        cookie = self.review.sessions.sign_in(name, str(form.get("token", "")))
        if cookie is None:
            return self.signin_page(request, 403, error="wrong token", next="/")
        response = RedirectResponse(_local_path(str(form.get("next", "/"))), 303)
        response.set_cookie(COOKIE, cookie, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    @signed_in
    def signout(self, request: Request, operator: str, form: FormData | None) -> Response:
        response = RedirectResponse("/signin", 303)
        response.delete_cookie(COOKIE)
        return response

    # --------------------------------------------------------------------------- views
    @signed_in
    def products(self, request: Request, operator: str, form: FormData | None) -> Response:
        names = list_products(self.review.store)
        queues = {name: queue_state(self.review.store, name, self.review.known_labels) for name in names}
        return self.render(request, "products.html", products=names, queues=queues)

    @signed_in
    def product(self, request: Request, operator: str, form: FormData | None) -> Response:
        state = product_state(self.review.store, _product(request), self.review.known_labels)
        links = {row.version: _model_link(self.review.mlflow_url, state.product, row.version)
                 for row in state.versions} if self.review.mlflow_url else {}
        return self.render(request, "product.html", state=state, plot=auroc_svg(state.versions), links=links)

    @signed_in
    def queue(self, request: Request, operator: str, form: FormData | None) -> Response:
        product = _product(request)
        state = queue_state(self.review.store, product, self.review.known_labels)
        view = "grid" if request.query_params.get("view") == "grid" else "card"
        at = min(_index(request.query_params.get("at")), max(0, len(state.items) - 1))
        shown = state.items[at:at + (GRID if view == "grid" else 1)]
        return self.render(request, "queue.html", product=product, state=state, view=view, at=at, shown=shown,
                           grid=GRID)

    @signed_in
    def picture(self, request: Request, operator: str, form: FormData | None) -> Response:
        product, version = _product(request), request.path_params["version"]
        if not version.isdigit():
            raise HTTPException(404, "no such picture")
        try:  # `picture_key` refuses any card id or kind it does not write: no request value becomes a path
            key = picture_key(product, version, request.path_params["item"], request.path_params["kind"])
        except ValueError:
            raise HTTPException(404, "no such picture") from None
        try:
            data = self.review.store.get_bytes(key)
        except ObjectNotFound:
            raise HTTPException(404, "no picture of this card") from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @signed_in
    def report(self, request: Request, operator: str, form: FormData | None) -> Response:
        product, version = _product(request), request.path_params["version"]
        run_id = next((v.run_id for v in registry.versions(product) if v.version == version), None)
        if not run_id:
            raise HTTPException(404, f"{product} has no version {version}")
        # The report is our own static page; sandboxed all the same, as it shows names from uploads.
        return HTMLResponse(tracking.read_report(run_id), headers={
            "Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"})

    # --------------------------------------------------------------------------- people's word
    @signed_in
    def label(self, request: Request, operator: str, form: FormData) -> Response:
        product = _product(request)
        label = str(form.get("label", ""))
        if label not in (GOOD, DEFECT):
            raise HTTPException(400, f"label {label!r}: good or defect")
        queued = queue_state(self.review.store, product, self.review.known_labels).items
        item = next((i for i in queued if i.id == form.get("item")), None)
        if item is None:
            raise HTTPException(409, "this card was labelled meanwhile or has left the queue; reload")
        images = read_sources(self.review.store, [item.image])
        add_labels(self.review.store, product, images, label, operator, item.reason,
                   str(form.get("defect_type", "")).strip() if label == DEFECT else "", drawn([item]))
        return _back_to_queue(product, form)

    @signed_in
    def undo(self, request: Request, operator: str, form: FormData) -> Response:
        """The operator's last label on the product still standing, retracted."""
        product = _product(request)
        history = label_history(self.review.store, product, self.review.known_labels)
        standing = current_labels(self.review.store, product, self.review.known_labels)
        last = next((e for e in reversed(history)
                     if e.by == operator and standing.get(e.image_sha256) == e), None)
        if last is None:
            raise HTTPException(409, "you have no label on this product to undo")
        image = (last.source, self.review.store.get_bytes(last.image_key))
        add_labels(self.review.store, product, [image], RETRACTED, operator, last.reason)
        return _back_to_queue(product, form)

    @signed_in
    def control(self, request: Request, operator: str, form: FormData) -> Response:
        product = _product(request)
        action, why = str(form.get("action", "")), str(form.get("why", ""))
        if form.get("confirm") != "yes":
            raise HTTPException(400, f"{action}: tick the confirmation first")
        store = self.review.store
        if action == control.PROMOTE:
            control.promote_by_hand(store, product, str(form.get("version", "")), operator, why)
        elif action == control.ROLLBACK:
            control.rollback(store, product, operator, why)
        elif action in (control.PIN, control.UNPIN):
            control.pin(store, product, action == control.PIN, operator, why)
        else:
            raise HTTPException(400, f"action {action!r}: promote, rollback, pin or unpin")
        return RedirectResponse(f"/p/{product}", 303)

    # --------------------------------------------------------------------------- faults
    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        return self.render(request, "error.html", exc.status_code, message=exc.detail)

    async def fault(self, request: Request, exc: Exception) -> Response:
        """A refused value or action, or a fault of the store or the registry, as one line."""
        if isinstance(exc, (LabelError, ValueError)):
            return self.render(request, "error.html", 400, message=str(exc))
        if isinstance(exc, RegistryError):
            return self.render(request, "error.html", 409, message=str(exc))
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return self.render(request, "error.html", 503, message=f"the store or the registry failed: {first[:300]}")


def _product(request: Request) -> str:
    try:
        return validate_name(request.path_params["product"], "product name")
    except ValueError as exc:
        raise HTTPException(404, str(exc)) from None


def _index(text: str | None) -> int:
    return int(text) if text and text.isdigit() and len(text) < 7 else 0


def _local_path(path: str) -> str:
    """Only a path of this site to go back to after signing in (never another host)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


def _back_to_queue(product: str, form: FormData) -> Response:
    view = "grid" if form.get("view") == "grid" else "card"
    return RedirectResponse(f"/p/{product}/queue?view={view}&at={_index(str(form.get('at', '0')))}", 303)


def _model_link(mlflow_url: str, product: str, version: str) -> str:
    return f"{mlflow_url.rstrip('/')}/#/models/{registry.model_name(product)}/versions/{version}"
