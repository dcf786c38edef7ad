"""Gate-training engine: resume, cancel, NaN guard, CLIP objective, checkpointing, data handling."""

from __future__ import annotations

import json

import pytest
import torch

import mole_core as mole
from train.config import TrainConfig
from train.data import scan_folder
from train.engine import TrainingDiverged, partial_path, train

CFG = dict(resolution=64, batch_size=2, lr=2e-2, warmup_steps=2, checkpoint_every=0, seed=3)


def _gates(result) -> dict[str, torch.Tensor]:
    return result.gates.tensors


def test_training_changes_only_gates_and_restores_model(backend, lora_set, refs_dir, tmp_path):
    experts = mole.load_experts(lora_set.paths)
    before = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    flags = [p.requires_grad for p in backend.unet.parameters()]
    res = train(TrainConfig(steps=4, **CFG), backend, experts, scan_folder(refs_dir),
                out_path=str(tmp_path / "g.safetensors"))
    assert res.steps_done == 4 and not res.cancelled and len(res.history) == 4
    assert all(torch.equal(v, backend.unet.state_dict()[k]) for k, v in before.items())
    assert flags == [p.requires_grad for p in backend.unet.parameters()]
    assert not any(m._forward_hooks for m in backend.unet.modules())  # detached afterwards
    assert any(t.abs().max() > 0 for k, t in _gates(res).items() if k.endswith(".weight"))
    gf = mole.read_gate_file(tmp_path / "g.safetensors")
    assert gf.info["training"]["steps_done"] == 4 and set(gf.info["metrics"]) >= {"loss", "denoise", "balance"}
    assert all(s.startswith("unet:") for s in gf.scopes)  # text encoders stay in NLA mode by default


def test_resume_after_cancel_reproduces_uninterrupted_run(backend, lora_set, refs_dir, tmp_path):
    experts = mole.load_experts(lora_set.paths)
    cfg = TrainConfig(steps=6, **CFG)
    full = train(cfg, backend, experts, scan_folder(refs_dir))
    seen = []
    ckpt = str(tmp_path / "state.safetensors")
    part = train(cfg, backend, experts, scan_folder(refs_dir), checkpoint_path=ckpt,
                 progress=lambda p: seen.append(p["step"]), should_stop=lambda: len(seen) >= 3)
    assert part.cancelled and part.steps_done == 3
    rest = train(cfg, backend, experts, scan_folder(refs_dir), checkpoint_path=ckpt, resume_from=ckpt)
    assert rest.steps_done == 6 and [h["step"] for h in rest.history] == list(range(1, 7))
    for k, v in _gates(full).items():
        assert torch.equal(v, _gates(rest)[k]), k


def test_progress_reports_fixed_keys(backend, lora_set, refs_dir):
    got = []
    train(TrainConfig(steps=2, **CFG), backend, mole.load_experts(lora_set.paths), scan_folder(refs_dir),
          progress=got.append)
    assert [p["step"] for p in got] == [1, 2]
    assert set(got[0]) >= {"step", "steps", "loss", "terms", "lr", "gate_entropy", "mean_gates", "eta_s",
                           "elapsed_s", "mean_gate_entropy"}
    assert len(got[0]["mean_gates"]) == 3 and abs(sum(got[0]["mean_gates"]) - 1) < 1e-3


class _NanAfter:
    """Wraps a backend; its predictions become NaN from the n-th call on."""

    def __init__(self, inner, n: int):
        self._inner, self._n, self._calls = inner, n, 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def predict(self, x_t, t, cond):
        self._calls += 1
        out = self._inner.predict(x_t, t, cond)
        return out * float("nan") if self._calls >= self._n else out


def test_nan_guard_stops_with_clear_error_and_keeps_last_good_gates(backend, lora_set, refs_dir, tmp_path):
    out = tmp_path / "g.safetensors"
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 3 .*last good gates kept in"):
        train(TrainConfig(steps=5, **CFG), _NanAfter(backend, 3), mole.load_experts(lora_set.paths),
              scan_folder(refs_dir), out_path=str(out))
    gf = mole.read_gate_file(partial_path(str(out)))  # finite (read_gate_file checks) and marked
    assert gf.info["training"]["diverged"] and gf.info["training"]["steps_done"] == 2


@pytest.mark.parametrize("failure", ["diverged", "cancelled"])
def test_a_failed_run_never_replaces_the_saved_gates(backend, lora_set, refs_dir, tmp_path, failure):
    """A diverged or cancelled run writes beside --out (``*.partial.safetensors``); the file saved before
    stays byte-identical."""
    experts = mole.load_experts(lora_set.paths)
    out = tmp_path / "g.safetensors"
    train(TrainConfig(steps=2, **CFG), backend, experts, scan_folder(refs_dir), out_path=str(out))
    before = out.read_bytes()
    if failure == "diverged":
        with pytest.raises(TrainingDiverged):
            train(TrainConfig(steps=5, seed=1, **{k: v for k, v in CFG.items() if k != "seed"}),
                  _NanAfter(backend, 3), experts, scan_folder(refs_dir), out_path=str(out))
    else:
        seen: list = []
        res = train(TrainConfig(steps=5, seed=1, **{k: v for k, v in CFG.items() if k != "seed"}), backend, experts,
                    scan_folder(refs_dir), out_path=str(out), progress=lambda p: seen.append(p),
                    should_stop=lambda: len(seen) >= 2)
        assert res.cancelled and res.path == partial_path(str(out))
    assert out.read_bytes() == before
    assert mole.read_gate_file(partial_path(str(out))).info["training"]["steps_done"] == 2


def test_gradient_checkpointing_gives_the_same_gates(backend, lora_set, refs_dir):
    experts = mole.load_experts(lora_set.paths)
    a = train(TrainConfig(steps=3, **CFG), backend, experts, scan_folder(refs_dir))
    b = train(TrainConfig(steps=3, gradient_checkpointing=True, **CFG), backend, experts, scan_folder(refs_dir))
    assert not backend.unet.is_gradient_checkpointing and not backend.unet.training
    for k, v in _gates(a).items():
        torch.testing.assert_close(v, _gates(b)[k], atol=1e-5, rtol=1e-4)


def test_text_gates_option_trains_text_encoder_scopes(backend, lora_set, refs_dir):
    res = train(TrainConfig(steps=2, train_text_gates=True, **CFG), backend, mole.load_experts(lora_set.paths),
                scan_folder(refs_dir))
    comps = {s.split(":")[0] for s in res.gates.scopes}
    assert comps == {"unet", "te"}


def tiny_clip():
    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    open_clip.factory._MODEL_CONFIGS["mole-test-tiny"] = cfg
    torch.manual_seed(0)
    return open_clip.create_model("mole-test-tiny"), open_clip.get_tokenizer("mole-test-tiny"), cfg


def test_clip_objective_runs_and_its_gradient_reaches_the_gates(backend, lora_set, refs_dir):
    from train.objectives import ClipGuide

    model, tok, _ = tiny_clip()
    guide = ClipGuide(model, tok, 32)
    cfg = TrainConfig(steps=2, objective="clip", clip_max_t=1.0, clip_decode_size=32, alpha=0.0, **CFG)
    res = train(cfg, backend, mole.load_experts(lora_set.paths), scan_folder(refs_dir), clip_guide=guide)
    assert res.history[-1]["clip_image"] > 0 and res.history[-1]["clip_text"] > 0
    assert "denoise" not in res.history[-1]
    moved = [k for k, v in _gates(res).items() if k.endswith(".weight") and v.abs().max() > 0]
    assert moved, "no gate weight changed: CLIP gradient did not reach the gates"
    assert not any(p.requires_grad for p in model.parameters())  # CLIP frozen


def test_reference_folder_captions_and_errors(tmp_path, refs_dir):
    refs = scan_folder(refs_dir)
    by = {(r.concept, r.path.name): r.caption for r in refs}
    assert by[("red", "0.png")] == "a red ball, close up"  # same-name .txt wins
    assert by[("red", "1.png")] == "a photo of a red ball"  # folder prompt.txt
    (tmp_path / "flat").mkdir()
    from tests.train.conftest import blob

    blob((1, 2, 3), 0).save(tmp_path / "flat" / "a.png")
    assert scan_folder(tmp_path / "flat", prompt="global")[0].caption == "global"
    with pytest.raises(mole.MoleError, match="no caption"):
        scan_folder(tmp_path / "flat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(mole.MoleError, match="no images"):
        scan_folder(tmp_path / "empty")
    with pytest.raises(mole.MoleError, match="not a directory"):
        scan_folder(tmp_path / "missing")


@pytest.mark.parametrize("kw,pattern", [
    ({"steps": 0}, "`steps` must be > 0"), ({"objective": "l2"}, "objective"), ({"granularity": "cell"}, "granularity"),
    ({"resolution": 30}, "multiple of 8"), ({"t_min": 0.9, "t_max": 0.1}, "t_min < t_max")])
def test_config_validation(kw, pattern):
    with pytest.raises(mole.MoleError, match=pattern):
        TrainConfig(**kw)


def test_config_round_trip():
    cfg = TrainConfig(steps=7, objective="denoise,clip")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.objectives == ["denoise", "clip"]


def test_cached_prompts_use_the_text_encoder_loras_in_nla_mode(backend, lora_set, refs_dir):
    """Training must see the conditioning sampling sees: text-encoder LoRA parts mixed at 1/N."""
    from train.engine import reference_cache

    experts = mole.load_experts(lora_set.paths)
    cfg = TrainConfig(steps=1, **CFG)
    refs = scan_folder(refs_dir)
    cache = reference_cache(backend, experts, refs, cfg)
    prompt = cache.captions[0]
    cached = cache.conds[cache.cond_index[0]]["encoder_hidden_states"]
    bare = backend.encode_prompts([prompt])["encoder_hidden_states"]
    nla = mole.attach(backend.mixture_target(), experts, mode="uniform", components=["te"])
    with torch.no_grad():
        want = backend.encode_prompts([prompt])["encoder_hidden_states"]
    nla.detach()
    assert torch.equal(cached, want) and not torch.allclose(cached, bare)
