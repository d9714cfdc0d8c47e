import pytest

from fsad_core.backbone import list_backbones
from fsad_core.methods import list_methods
from fsad_core.options import BUNDLED_BACKBONES, METHOD_NAMES, check_registered


def test_the_registries_define_the_names_the_command_line_offers():
    assert tuple(list_methods()) == METHOD_NAMES
    assert tuple(list_backbones()) == BUNDLED_BACKBONES


def test_a_registry_that_differs_from_its_list_refuses_to_import():
    check_registered("method", {"pretrained": None, "fast": None}, ("pretrained", "fast"))
    with pytest.raises(ImportError, match=r"defines \('pretrained',\), but fsad_core.options lists"):
        check_registered("method", ["pretrained"], ("pretrained", "fast"))
