"""The upload sensor: announce each complete upload once as the Prefect event ``fsad.upload.completed``.

A deployment trigger (``retrain-on-upload`` in prefect.yaml) turns each event into a retraining run,
so the sensor only has to notice uploads; it never trains. It runs on an interval schedule and is
idempotent: after an event is sent, a marker ``sensor/announced/PRODUCT/UPLOAD_ID.json`` is written
to the store. The marker lives outside the upload's prefix because validation rejects any object in
an upload that its manifest does not list.

Delivery is at least once: the marker is written only after the event went out, and a crash in
between re-sends it on the next run. The event id is derived from the upload and its content, so
the Prefect server drops such a repeat when it comes within its de-duplication window; a later one
starts a retraining run that stops at "already trained" (same content hash).

S3 event notifications (``s3:ObjectCreated`` on ``*/manifest.json``, e.g. through a webhook that
calls ``emit_event``) could feed the same event without polling; the trigger stays as it is.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.events import Event
from prefect.events.clients import get_events_client

from flows.store.storage import Store, UploadInfo, list_products, list_uploads, manifest_key, open_store, validate_name
from flows.store.upload import ManifestError, read_manifest

EVENT = "fsad.upload.completed"
ANNOUNCED_PREFIX = "sensor/announced/"
_EVENT_ID_NAMESPACE = uuid.UUID("5b3f7f0e-6c1d-4f3e-9a55-2f6d0c1e8a11")


def resource_id(product: str, upload_id: str) -> str:
    return f"fsad.upload.{product}.{upload_id}"


def announced_key(product: str, upload_id: str) -> str:
    return f"{ANNOUNCED_PREFIX}{validate_name(product, 'product name')}/{validate_name(upload_id, 'upload id')}.json"


def unannounced_uploads(store: Store) -> list[UploadInfo]:
    """Complete uploads (manifest present) without a marker, oldest first per product."""
    announced = set(store.list(ANNOUNCED_PREFIX))
    return [u for product in list_products(store) for u in list_uploads(store, product)
            if u.complete and announced_key(product, u.upload_id) not in announced]


def upload_event(store: Store, upload: UploadInfo) -> Event:
    """The event for one complete upload. A malformed manifest is still announced (without a content
    hash): judging it, and quarantining it, is the retraining flow's validation step."""
    try:
        manifest: dict[str, Any] | None = read_manifest(store, upload.product, upload.upload_id)
    except ManifestError:
        manifest = None
    content = manifest.get("content_sha256") if manifest else None
    rid = resource_id(upload.product, upload.upload_id)
    return Event(
        id=uuid.uuid5(_EVENT_ID_NAMESPACE, f"{rid}/{content}"),
        event=EVENT,
        resource={"prefect.resource.id": rid, "prefect.resource.name": f"{upload.product}/{upload.upload_id}",
                  "fsad.product": upload.product, "fsad.upload_id": upload.upload_id},
        related=[{"prefect.resource.id": f"fsad.product.{upload.product}", "prefect.resource.role": "product",
                  "fsad.product": upload.product}],
        payload={"content_sha256": content, "manifest_valid": manifest is not None,
                 "manifest": store.uri(manifest_key(upload.product, upload.upload_id)),
                 "n_files": len(manifest["files"]) if manifest else None},
    )


def mark_announced(store: Store, upload: UploadInfo, event: Event) -> str:
    key = announced_key(upload.product, upload.upload_id)
    store.put_json(key, {"event": event.event, "event_id": str(event.id),
                         "content_sha256": event.payload.get("content_sha256"),
                         "announced": datetime.now(UTC).isoformat(timespec="seconds")})
    return key


@flow(name="upload-sensor")
async def upload_sensor_flow() -> list[str]:
    """Send ``fsad.upload.completed`` for every complete upload not announced yet; returns their
    resource ids. Each event is awaited on the events client (not queued in the background) so that
    a marker is never written for an event that did not leave this process."""
    logger = get_run_logger()
    store = open_store()
    pending = unannounced_uploads(store)
    sent: list[str] = []
    async with get_events_client() as events:
        for upload in pending:
            event = upload_event(store, upload)
            await events.emit(event)
            mark_announced(store, upload, event)
            sent.append(event.resource.id)
            logger.info("announced %s (content %s)", event.resource.id, event.payload["content_sha256"])
    logger.info("%d new complete upload(s) announced", len(sent))
    return sent
