"""People over the gate: promote a version, roll back to the previous champion, or pin a product
(automatic promotion off). Each action names who and why, and is kept in the product's action log
in the store (append-only, one object an action) and on the registry's tags.

A person may promote a version the gate failed, never one that failed verification: what the line
runs is always byte for byte what the pipeline wrote.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from flows.mlops import registry
from flows.mlops.registry import CHAMPION, PREVIOUS, RegistryError
from flows.store.records import append_record, checked_text, record_time
from flows.store.storage import PRODUCTS, Store, validate_name

PROMOTE, ROLLBACK, PIN, UNPIN = "promote", "rollback", "pin", "unpin"
PINNED_TAG = "fsad.pinned"  # a registered model tag: "true" while automatic promotion is off


@dataclass(frozen=True)
class Action:
    product: str
    action: str
    by: str
    why: str
    at: str
    version: str = ""  # the champion after the action ("" when there is none)


def actions_prefix(product: str) -> str:
    return f"{PRODUCTS}/{validate_name(product, 'product name')}/actions/"


def _record(store: Store, product: str, action: str, by: str, why: str, version: str) -> Action:
    done = Action(product, action, by, why, record_time(), version)
    append_record(store, actions_prefix(product), done.at, json.dumps(asdict(done), sort_keys=True))
    return done


def action_log(store: Store, product: str) -> list[Action]:
    """The product's actions, oldest first."""
    return [Action(**json.loads(store.get_bytes(key))) for key in sorted(store.list(actions_prefix(product)))]


def is_pinned(product: str) -> bool:
    return registry.registered_model_tags(product).get(PINNED_TAG) == "true"


def promote_by_hand(store: Store, product: str, version: str, by: str, why: str) -> Action:
    """Make a verified version champion, whatever the gate said of it."""
    by, why = checked_text(by, "--by"), checked_text(why, "--why")
    tags = registry.version_tags(product, version)
    if tags.get("verified") != "true":
        raise RegistryError(f"{registry.model_name(product)} v{version} is not verified; a person may overrule the "
                            f"gate, not verification")
    registry.move_champion(product, version)
    registry.set_version_tags(product, version, {"promoted_by": by, "promoted_why": why})
    return _record(store, product, PROMOTE, by, why, version)


def rollback(store: Store, product: str, by: str, why: str) -> Action:
    """Champion back to the previous champion; the one it replaces becomes previous."""
    by, why = checked_text(by, "--by"), checked_text(why, "--why")
    before = registry.aliases(product).get(PREVIOUS)
    if before is None:
        raise RegistryError(f"{registry.model_name(product)} has no {PREVIOUS} version to roll back to")
    registry.move_champion(product, before)
    return _record(store, product, ROLLBACK, by, why, before)


def pin(store: Store, product: str, pinned: bool, by: str, why: str) -> Action:
    """Automatic promotion off (``pinned``) or on again; retrainings still run, register and are gated."""
    by, why = checked_text(by, "--by"), checked_text(why, "--why")
    registry.set_registered_model_tag(product, PINNED_TAG, "true" if pinned else "false")
    return _record(store, product, PIN if pinned else UNPIN, by, why, registry.aliases(product).get(CHAMPION, ""))
