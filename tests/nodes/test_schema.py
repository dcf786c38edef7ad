"""The node set as ComfyUI sees it: ids, categories, tooltips, entry point, import rule."""

from __future__ import annotations

import asyncio
import sys

import pytest

pytestmark = pytest.mark.comfy

NODE_IDS = {"MoLE_LoadExperts", "MoLE_Apply", "MoLE_SaveGates", "MoLE_LoadGates", "MoLE_VisualizeGates", "MoLE_Bake",
            "MoLE_TrainGates"}


def test_entrypoint_lists_every_node(mole):
    from tests.nodes.conftest import load_mole_package

    package, nodes = load_mole_package()
    extension = asyncio.run(package.comfy_entrypoint())
    listed = asyncio.run(extension.get_node_list())
    assert {n.define_schema().node_id for n in listed} == NODE_IDS
    assert nodes is mole


def test_every_input_has_a_tooltip_and_plain_names(mole):
    for node in mole.NODES:
        schema = node.define_schema()
        assert schema.category == "MoLE" and schema.is_experimental, schema.node_id
        assert schema.display_name and "_" not in schema.display_name, schema.node_id
        assert schema.description, schema.node_id
        for item in schema.inputs:
            assert item.tooltip, f"{schema.node_id}.{item.id} has no tooltip"
        info = node.GET_NODE_INFO_V1()
        assert info["category"] == "MoLE" and info["experimental"] is True


def test_our_nodes_package_never_takes_the_top_level_name(mole):
    assert mole.__name__.endswith(".nodes") and mole.__name__ != "nodes"
    top = sys.modules.get("nodes")  # ComfyUI's nodes.py owns that name, if anything imported it
    assert top is None or top.__file__.endswith("nodes.py")
    assert "mole_core" in sys.modules
