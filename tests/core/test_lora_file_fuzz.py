"""Property-based fuzzing of the LoRA-file reader (hypothesis): whatever is done to a valid kohya, diffusers
(with its ``lora_adapter_metadata`` header) or LoHa file's tensors, metadata or header bytes, ``load_expert``
either returns an expert whose factors are floating-point, 2-D or 4-D and of rank ≥ 1 — and finite, or refused
with a one-line MoleError when attached (NaN entries are checked there) — or raises a one-line MoleError; never
another exception."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import mole_core as mole
from mole_core.expert import check_experts
from tests.core._files import damage_header

pytestmark = pytest.mark.filterwarnings("ignore::mole_core.MoleWarning")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
D = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
FILLS = [0.0, 1.0, -3.0, 1e30, float("nan"), float("inf")]


def _valid(kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    g = torch.Generator().manual_seed(0)
    if kind == "kohya":
        return {f"{K}.lora_down.weight": torch.randn(4, 32, generator=g),
                f"{K}.lora_up.weight": torch.randn(32, 4, generator=g), f"{K}.alpha": torch.tensor(2.0)}, {}
    if kind == "diffusers":
        meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {}})}
        return {f"{D}.lora_A.weight": torch.randn(4, 32, generator=g),
                f"{D}.lora_B.weight": torch.randn(32, 4, generator=g)}, meta
    return {f"{K}.hada_w1_a": torch.randn(32, 4, generator=g), f"{K}.hada_w1_b": torch.randn(4, 32, generator=g),
            f"{K}.hada_w2_a": torch.randn(32, 4, generator=g), f"{K}.hada_w2_b": torch.randn(4, 32, generator=g),
            f"{K}.alpha": torch.tensor(2.0)}, {}


KINDS = ["kohya", "diffusers", "loha"]


def _read(path) -> None:  # noqa: ANN001
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expert = mole.load_expert(path)
    except mole.MoleError as exc:
        assert "\n" not in str(exc)
        return
    assert expert.factors
    for f in expert.factors.values():
        for t in (f.down, f.up):
            if t is not None:
                assert t.is_floating_point() and t.dim() >= 2 and min(t.shape) >= 1
        assert f.rank >= 1 and f.up.shape[1] == f.rank
        if not torch.isfinite(f.delta()).all():
            with pytest.raises(mole.MoleError, match="NaN/inf") as exc:
                check_experts([expert])
            assert "\n" not in str(exc.value)


@FUZZ
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_any_tensor_change_is_read_or_refused_in_one_line(tmp_path, kind, data):
    tensors, meta = _valid(kind)
    key = data.draw(st.sampled_from(sorted(tensors)))
    action = data.draw(st.sampled_from(["drop", "reshape", "value", "extra"]))
    if action == "drop":
        del tensors[key]
    elif action == "extra":
        tensors[f"{key.rsplit('.', 1)[0]}.{data.draw(st.sampled_from(['alpha', 'dora_scale', 'junk']))}"] = \
            torch.full(tuple(data.draw(st.lists(st.integers(0, 3), max_size=2))), 1.0)
    else:
        shape = tuple(data.draw(st.lists(st.integers(0, 4), max_size=3))) if action == "reshape" \
            else tuple(tensors[key].shape)
        tensors[key] = torch.full(shape, data.draw(st.sampled_from(FILLS))).to(data.draw(st.sampled_from(DTYPES)))
    path = tmp_path / "l.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta or None)
    _read(path)


@FUZZ
@given(value=JSON, as_text=st.booleans())
def test_any_adapter_metadata_is_read_or_refused_in_one_line(tmp_path, value, as_text):
    tensors, _ = _valid("diffusers")
    meta = {"lora_adapter_metadata": str(value)[:40] if as_text else json.dumps(value)}
    path = tmp_path / "l.safetensors"
    save_file(tensors, str(path), metadata=meta)
    _read(path)


@FUZZ
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_any_byte_damage_is_read_or_refused_in_one_line(tmp_path, kind, data):
    tensors, meta = _valid(kind)
    path = tmp_path / "l.safetensors"
    save_file(tensors, str(path), metadata=meta or None)
    damage_header(path, data)
    _read(path)


def _with(kind: str, key: str, value: torch.Tensor | None) -> tuple[dict, dict]:
    tensors, meta = _valid(kind)
    full = next(k for k in tensors if k.endswith(key))
    if value is None:
        del tensors[full]
    else:
        tensors[full] = value
    return tensors, meta


@pytest.mark.parametrize("kind, key, value, message", [
    ("kohya", "lora_down.weight", torch.tensor(1.0), r"down must be a 2-D or 4-D tensor .* got shape \(\)"),
    ("kohya", "lora_up.weight", torch.ones(32), r"up must be a 2-D or 4-D tensor .* got shape \(32,\)"),
    ("kohya", "lora_down.weight", torch.ones(0, 32), r"no empty dimension, got shape \(0, 32\)"),
    ("kohya", "alpha", torch.ones(2), r"alpha must be one number, got shape \(2,\)"),
    ("kohya", "alpha", torch.tensor(float("nan")), "alpha must be finite"),
    ("kohya", "alpha", torch.tensor(float("inf")), "alpha must be finite"),
    ("kohya", "lora_up.weight", torch.full((32, 4), 1e30), r"beyond ±1000"),
    ("kohya", "lora_up.weight", torch.full((32, 4), float("inf")), r"beyond ±1000"),
    ("kohya", "lora_up.weight", torch.ones(32, 4, dtype=torch.int64), "up must be floating point, got torch.int64"),
    ("kohya", "lora_down.weight", torch.ones(4, 32, dtype=torch.bool), "must be floating point, got torch.bool"),
    ("kohya", "lora_up.weight", torch.ones(32, 3), "up has rank 3, down has rank 4"),
    ("kohya", "lora_up.weight", torch.ones(32, 4, 3, 3), r"differ in dimensions"),
    ("diffusers", "lora_B.weight", torch.ones(32, 4, dtype=torch.float16).to(torch.uint8), "floating point"),
    ("loha", "hada_w1_b", None, r"malformed LoHa module"),
    ("loha", "hada_w2_a", torch.ones(31, 4), r"malformed LoHa module"),
])
def test_malformed_lora_modules_are_one_line_errors(tmp_path, kind, key, value, message):
    """The issue's cases: wrong dimensionality, rank 0, non-scalar or non-finite alpha, huge or non-float factors,
    mismatched parts — each refused at load time, naming the module."""
    tensors, meta = _with(kind, key, value)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta or None)
    with pytest.raises(mole.MoleError, match=message) as exc:
        mole.load_expert(path)
    assert "\n" not in str(exc.value) and "bad.safetensors" in str(exc.value)


@pytest.mark.parametrize("metadata, message", [
    ("{not json", "lora_adapter_metadata: malformed JSON"),
    ("[1, 2]", "lora_adapter_metadata must be a JSON object, got list"),
    ('{"unet.lora_alpha": "eight"}', "lora_alpha must be a finite number"),
    ('{"unet.lora_alpha": true}', "lora_alpha must be a finite number"),
    ('{"unet.alpha_pattern": [1]}', "alpha_pattern must be a JSON object"),
])
def test_malformed_adapter_metadata_is_a_one_line_error(tmp_path, metadata, message):
    tensors, _ = _valid("diffusers")
    path = tmp_path / "meta.safetensors"
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": metadata})
    with pytest.raises(mole.MoleError, match=message) as exc:
        mole.load_expert(path)
    assert "\n" not in str(exc.value)


def test_malformed_peft_adapter_config_is_a_one_line_error(tmp_path):
    tensors, _ = _valid("diffusers")
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({k.replace("unet.", "base_model.model."): v for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text("{\"r\": 4, \"lora_alpha\": ")
    with pytest.raises(mole.MoleError, match="adapter_config.json: malformed JSON") as exc:
        mole.load_expert(folder)
    assert "\n" not in str(exc.value)
