"""People over the gate: promote, rollback and pin move the aliases as asked, refuse what they must
(an unverified version, nothing to roll back to), and leave who and why in the action log."""

import pytest
from mlflow import MlflowClient

from flows.cli.main import main as cli_main
from flows.mlops import control, registry
from flows.mlops.registry import CHAMPION, PREVIOUS, RegistryError
from flows.store.storage import open_store
from tests.local_home import local_home

P = "ctl"


@pytest.fixture
def home(tmp_path, monkeypatch):
    settings = local_home(tmp_path / "home", monkeypatch)
    client, name = MlflowClient(), registry.model_name(P)
    client.create_registered_model(name)
    for verified in ("true", "true", "false"):  # versions 1 and 2 verified, 3 not
        model = tmp_path / "model"
        model.mkdir(exist_ok=True)
        client.create_model_version(name, str(model), tags={"verified": verified, "gate.verdict": "failed"})
    client.set_registered_model_alias(name, CHAMPION, "1")
    return open_store(settings.storage_url)


def test_a_person_promotes_a_verified_version_the_gate_failed_and_rolls_back(home):
    done = control.promote_by_hand(home, P, "2", "ann", "the labels say v2 misses fewer dents")
    assert registry.aliases(P) == {CHAMPION: "2", PREVIOUS: "1"}
    assert registry.version_tags(P, "2")["promoted_by"] == "ann" and done.version == "2"
    control.rollback(home, P, "bob", "v2 flags the new lot")
    assert registry.aliases(P) == {CHAMPION: "1", PREVIOUS: "2"}
    assert [(a.action, a.by, a.version) for a in control.action_log(home, P)] == [
        ("promote", "ann", "2"), ("rollback", "bob", "1")]


def test_an_unverified_version_is_never_promoted_by_hand_and_nothing_moves(home):
    with pytest.raises(RegistryError, match="not verified"):
        control.promote_by_hand(home, P, "3", "ann", "try")
    with pytest.raises(ValueError, match="--why"):
        control.promote_by_hand(home, P, "2", "ann", " ")
    assert registry.aliases(P) == {CHAMPION: "1"} and control.action_log(home, P) == []
    with pytest.raises(RegistryError, match="no previous version"):
        control.rollback(home, P, "ann", "nothing before")


def test_pin_turns_automatic_promotion_off_and_on_from_the_command_line(home, capsys):
    assert not control.is_pinned(P)
    assert cli_main(["pin", "--product", P, "--why", "audit of lot 7", "--by", "ann"]) == 0
    assert control.is_pinned(P) and "pin by ann (audit of lot 7); champion v1" in capsys.readouterr().out
    assert cli_main(["pin", "--product", P, "--off", "--why", "audit done"]) == 0
    assert not control.is_pinned(P)
    assert cli_main(["promote", "--product", P, "--version", "3", "--why", "x"]) == 1
    assert "not verified" in capsys.readouterr().err
