"""Property-based fuzzing of the gate-file reader (hypothesis): whatever is done to a valid file's metadata,
tensors or header bytes, ``read_gate_file`` either returns a gate file or raises a one-line MoleError —
never another exception, never NaN gates."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import mole_core as mole
from tests.core._files import damage_header
from tests.core._models import TinyNet, random_expert

pytestmark = pytest.mark.filterwarnings("ignore::mole_core.MoleWarning")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@pytest.fixture(scope="module", params=["softmax", "sigmoid"])
def valid(request, tmp_path_factory) -> tuple[dict, dict]:
    torch.manual_seed(0)
    net = TinyNet().eval()
    experts = [random_expert(net, 4, seed) for seed in (1, 2)]
    mix = mole.attach(net, experts, mole.GateConfig(family=request.param, init_std=0.3))
    gf = mole.snapshot(mix)
    mix.detach()
    return dict(gf.tensors), json.loads(json.dumps(gf.info))


def _read(path) -> None:  # noqa: ANN001
    try:
        gf = mole.read_gate_file(path)
    except mole.MoleError as exc:
        assert "\n" not in str(exc)
        return
    for t in gf.tensors.values():
        assert torch.isfinite(t).all()


def _write(path, tensors: dict, info: object) -> None:  # noqa: ANN001
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"mole": json.dumps(info)})


@FUZZ
@given(data=st.data())
def test_any_metadata_change_is_read_or_refused_in_one_line(valid, tmp_path, data):
    tensors, info = valid
    info = json.loads(json.dumps(info))
    where = data.draw(st.sampled_from(["format", "version", "gate_config", "experts", "scopes", "cfg_field",
                                       "scope_field", "expert_name", "whole"]))
    value = data.draw(JSON)
    if where == "whole":
        info = value
    elif where == "cfg_field":
        info["gate_config"][data.draw(st.sampled_from(sorted(info["gate_config"])))] = value
    elif where == "scope_field":
        scope = data.draw(st.sampled_from(sorted(info["scopes"])))
        info["scopes"][scope][data.draw(st.sampled_from(["feature_dim", "lead", "targets"]))] = value
    elif where == "expert_name":
        info["experts"][0]["name"] = value
    else:
        info[where] = value
    path = tmp_path / "g.safetensors"
    _write(path, tensors, info)
    _read(path)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


@FUZZ
@given(data=st.data())
def test_any_tensor_change_is_read_or_refused_in_one_line(valid, tmp_path, data):
    tensors, info = valid
    tensors = dict(tensors)
    key = data.draw(st.sampled_from(sorted(tensors)))
    action = data.draw(st.sampled_from(["drop", "reshape", "value", "extra"]))
    if action == "drop":
        del tensors[key]
    elif action == "extra":
        tensors["gates.nowhere.weight"] = torch.zeros(2, 3)
    else:
        shape = tuple(data.draw(st.lists(st.integers(0, 4), max_size=3))) if action == "reshape" \
            else tuple(tensors[key].shape)
        fill = data.draw(st.sampled_from([0.0, 1.0, -3.0, 1e30, float("nan"), float("inf")]))
        tensors[key] = torch.full(shape, fill).to(data.draw(st.sampled_from(DTYPES)))
    path = tmp_path / "g.safetensors"
    _write(path, tensors, info)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _read(path)


@FUZZ
@given(data=st.data())
def test_any_byte_damage_is_read_or_refused_in_one_line(valid, tmp_path, data):
    tensors, info = valid
    path = tmp_path / "g.safetensors"
    _write(path, tensors, info)
    damage_header(path, data)
    _read(path)


@pytest.mark.parametrize("change, message", [
    (lambda t, i: t.update({k: v[:1] for k, v in t.items() if k.endswith(".weight")}), r"has shape \(1, 16\)"),
    (lambda t, i: t.update({k: v.reshape(()) if v.numel() == 1 else v[0] for k, v in t.items()
                            if k.endswith(".bias")}), r"bias has shape \(\), expected \(2,\)"),
    (lambda t, i: i["gate_config"].update(tau_min=1e-9), "tau_min"),
    (lambda t, i: i.update(version="2"), "`version` must be an integer"),
    (lambda t, i: i.update(scopes=[]), "`scopes` must be a non-empty JSON object"),
    (lambda t, i: t.update({k: v * 1e6 for k, v in t.items() if k.endswith(".weight")}), "beyond"),
])
def test_broadcastable_or_absurd_gate_files_are_refused(valid, tmp_path, change, message):
    """Shapes that broadcast silently changed the routing; a tiny tau_min gave NaN gates."""
    tensors, info = dict(valid[0]), json.loads(json.dumps(valid[1]))
    change(tensors, info)
    path = tmp_path / "g.safetensors"
    _write(path, tensors, info)
    with pytest.raises(mole.MoleError, match=message):
        mole.read_gate_file(path)


def test_tensors_of_no_scope_warn(valid, tmp_path):
    tensors, info = dict(valid[0]), valid[1]
    tensors["gates.unknown:x.weight"] = torch.zeros(2, 4)
    path = tmp_path / "g.safetensors"
    _write(path, tensors, info)
    with pytest.warns(mole.MoleWarning, match="belong to no scope"):
        mole.read_gate_file(path)


@pytest.mark.parametrize("key", ["\n", "family\nx", "a" * 300])
def test_unknown_gate_config_keys_are_one_line_errors_that_name_them(valid, tmp_path, key):
    """Found by the fuzz test above: an unknown key with a newline made the message two lines."""
    tensors, info = valid
    info = json.loads(json.dumps(info))
    info["gate_config"][key] = 1
    _write(tmp_path / "g.safetensors", tensors, info)
    with pytest.raises(mole.MoleError, match="unknown key") as exc:
        mole.read_gate_file(tmp_path / "g.safetensors")
    assert "\n" not in str(exc.value) and repr(key)[:20] in str(exc.value)
