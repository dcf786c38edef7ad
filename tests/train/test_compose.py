"""Objective ``compose`` on the toy world: rollouts of composed prompts scored by the toy CLIP.

Oracles: the gradient reaches the gate parameters only (every model weight stays without a gradient),
the v-prediction algebra against :func:`train.backend.predicted_x0`, determinism per seed, gate files
that cover the UNet and the text encoder and sample through the CLI, and one-line errors before the
model loads.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import mole_core as mole
from tests.train._toy import load_compose_toy
from train.backend import predicted_x0
from train.compose import (
    ComposeObjective,
    ComposePrompts,
    latent_shape,
    named_concepts,
    reference_embeddings,
    rollout_timesteps,
    x0_and_eps,
)
from train.config import TrainConfig
from train.data import load_image, to_tensor
from train.engine import gate_statistics, reference_cache, train

CONCEPTS = ["purple", "striped", "star"]
ROOT = Path(__file__).resolve().parents[2]
RECIPE = dict(resolution=32, batch_size=4, seed=0, checkpoint_every=0, objective="compose", gate_family="sigmoid",
              gate_input="prompt", text_pool="max", train_text_gates=True, rollout_steps=3, lr=3e-2)


@pytest.fixture(scope="module")
def toy():  # noqa: ANN201
    return load_compose_toy(CONCEPTS, (2, 3), 4)


def test_named_concepts_and_rollout_timesteps():
    assert named_concepts("A Purple striped star on grey", CONCEPTS) == CONCEPTS
    assert named_concepts("a purplestar on grey", CONCEPTS) == []
    assert rollout_timesteps(1000, 4) == [999, 749, 500, 250]
    assert rollout_timesteps(1000, 1) == [999]
    with pytest.raises(mole.MoleError, match="rollout_steps"):
        rollout_timesteps(1000, 0)
    with pytest.raises(mole.MoleError, match="at least one composition prompt"):
        ComposePrompts([], ["a red circle on grey"])


def testx0_and_eps_matches_the_backend_algebra_for_every_parameterisation():
    alphas = torch.linspace(0.999, 0.01, 1000)
    x, out = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = 400
    for kind in ("epsilon", "v_prediction", "sample"):
        x0, eps = x0_and_eps(kind, alphas, x, out, t)
        torch.testing.assert_close(x0, predicted_x0(kind, alphas, x, out, torch.full((2,), t)))
        a = alphas[t]
        torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * eps, x)  # (x0, ε) re-noise to x_t
    zero_snr = alphas.clone()
    zero_snr[-1] = 0.0
    x0, eps = x0_and_eps("v_prediction", zero_snr, x, out, 999)
    assert torch.isfinite(x0).all() and torch.equal(x0, -out) and torch.equal(eps, x)


def test_exclude_term_by_hand():
    """relu(cos(image, refs_c) − cos(base image, refs_c)) over the concepts a prompt does not name."""
    obj = ComposeObjective.__new__(ComposeObjective)
    obj.ref_emb = {"alpha": torch.tensor([1.0, 0.0]), "beta": torch.tensor([0.0, 1.0])}
    emb = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # row 0 names alpha: only beta counts, 0.8 − 0.0; row 1 names none: alpha 0.8 − 0.0, beta relu(0.6 − 1.0) = 0
    got = obj._exclude(emb, base, ["an alpha thing", "a plain thing"])
    torch.testing.assert_close(got, torch.tensor((0.8 + 0.8 + 0.0) / 3))


def test_gradients_reach_only_the_gates(toy):
    terms = _terms_and_gradient_checks(toy, TrainConfig(**RECIPE))
    assert set(terms) == {"global", "local", "prior"} and float(terms["prior"].detach()) > 0


def test_exclude_term_and_token_pooling_also_train_only_the_gates(toy):
    terms = _terms_and_gradient_checks(toy, TrainConfig(**{**RECIPE, "exclude_weight": 1.0, "text_pool": "tokens"}))
    assert set(terms) == {"global", "local", "prior", "exclude"} and float(terms["prior"].detach()) > 0


@contextlib.contextmanager
def _one_compose_step(toy, cfg: TrainConfig):  # noqa: ANN001, ANN202
    """Attach gates for ``cfg``, freeze every model weight, run one compose step and its backward; yields
    ``(mixture, terms, frozen weights)`` and restores everything after."""
    world, pipe, backend, experts, refs, prompts, guide = toy
    mix = mole.attach(pipe, experts, cfg.gate_config())
    frozen = [p for m in backend.denoiser_modules() for p in m.parameters()]
    flags = [p.requires_grad for p in frozen]
    try:
        for p in frozen:
            p.requires_grad_(False)
        emb = reference_embeddings(guide, [to_tensor(load_image(r), 32) for r in refs], [r.concept for r in refs])
        obj = ComposeObjective(cfg, backend, [mix], guide, prompts, emb, latent_shape(backend, 32))
        terms = obj(torch.Generator().manual_seed(0), 4)
        sum(terms.values()).backward()
        yield mix, terms, frozen
    finally:
        mix.detach()
        for p, f in zip(frozen, flags):
            p.requires_grad_(f)


def _terms_and_gradient_checks(toy, cfg: TrainConfig) -> dict:  # noqa: ANN001
    """One compose step's terms, after checking that its gradient reaches every gate of the UNet and the text
    encoder and no model weight."""
    with _one_compose_step(toy, cfg) as (mix, terms, frozen):
        assert all(p.grad is None for p in frozen)
        grads = {n: p.grad for n, p in mix.gates.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        by_comp = {c: sum(float(grads[n].abs().sum()) for n in grads if mix.scope_names[int(n.split(".")[0][1:])]
                              .startswith(c)) for c in ("unet", "te")}
        assert by_comp["unet"] > 0 and by_comp["te"] > 0, by_comp
    return terms


def test_training_is_deterministic_and_gates_cover_unet_and_text_encoder(toy):
    world, pipe, backend, experts, refs, prompts, guide = toy
    cfg = TrainConfig(steps=3, **RECIPE)
    a = train(cfg, backend, experts, refs, compose_prompts=prompts, guide=guide)
    b = train(cfg, backend, experts, refs, compose_prompts=prompts, guide=guide)
    assert a.gates.components() == ["te", "unet"] and a.gates.config.family == "sigmoid"
    for k, v in a.gates.tensors.items():
        assert torch.equal(v, b.gates.tensors[k]), k
    assert {"global", "local", "prior"} <= set(a.history[-1])
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.gates.tensors.items() if k.endswith("weight"))
    with pytest.raises(mole.MoleError, match="composition prompts and an image-text guide"):
        train(cfg, backend, experts, refs, guide=guide)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_cli_trains_compose_gates_and_samples_with_them(toy, tmp_path):
    world = toy[0]
    refs = world.write_reference_folder(tmp_path / "refs", CONCEPTS, n=2)
    (tmp_path / "comps.txt").write_text("# composition prompts\na purple striped circle on grey\n"
                                        "a purple star on white\n")
    loras = [f"--lora={p}" for p in world.expert_paths(CONCEPTS)]
    out = tmp_path / "g.safetensors"
    common = ["--base", str(world.pipeline_dir), *loras]
    r = _cli("train", *common, "--images", str(refs), "--out", str(out), "--objective", "compose",
             "--clip-arch", "toy", "--clip-model", str(world.clip_path), "--compose-prompts",
             str(tmp_path / "comps.txt"), "--compose-prompt", "a striped star on black", "--base-prompt",
             "a red circle on grey", "--gate-family", "sigmoid", "--gate-input", "prompt", "--text-pool", "max",
             "--train-text-gates", "--steps", "2", "--batch-size", "2", "--resolution", "32", "--rollout-steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    gf = mole.read_gate_file(out)
    assert gf.components() == ["te", "unet"] and gf.info["training"]["objective"] == "compose"
    s = _cli("sample", *common, "--gates", str(out), "--prompt", "a purple star on grey", "--size", "32",
             "--steps", "2", "--out", str(tmp_path / "samples"))
    assert s.returncode == 0, s.stderr[-2000:]
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1
    # one-line errors before the model loads; the gate file stays as it was
    before = out.read_bytes()
    for extra, msg in ((["--compose-prompt", "a red circle on grey"], "names none of the concepts"),
                       ([], "needs composition prompts"),
                       (["--compose-prompts", str(tmp_path / "missing.txt")], "file not found")):
        bad = _cli("train", *common, "--images", str(refs), "--out", str(out), "--objective", "compose",
                   "--clip-arch", "toy", "--clip-model", str(world.clip_path), *extra)
        assert bad.returncode == 2 and msg in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
    assert out.read_bytes() == before


def test_word_dropout_keeps_every_trigger_word_and_twins_drop_them(toy):
    world, pipe, backend, experts, refs, prompts, guide = toy
    cfg = TrainConfig(**{**RECIPE, "word_dropout": 0.6, "base_share": 0.25})
    emb = {c: torch.zeros(64) for c in CONCEPTS}
    obj = ComposeObjective(cfg, backend, [], guide, prompts, emb, (4, 8, 8))
    gen = torch.Generator().manual_seed(3)
    shortened = 0
    for _ in range(20):
        drawn, n_comp, n_twin = obj.draw(gen, 8)
        assert (n_comp, n_twin) == (3, 3) and len(drawn) == 8
        for p in drawn[:n_comp]:
            original = next(o for o in prompts.compositions if set(p.split()) <= set(o.split())
                            and named_concepts(o, CONCEPTS) == named_concepts(p, CONCEPTS))
            shortened += len(p.split()) < len(original.split())
            assert p in obj.text_emb and obj.named[p] == named_concepts(original, CONCEPTS)
        for comp, twin in zip(drawn[:n_twin], drawn[n_comp:n_comp + n_twin]):
            assert named_concepts(twin, CONCEPTS) == [] and twin.split() == [
                w for w in comp.split() if w not in CONCEPTS]
        assert all(p in prompts.base for p in drawn[n_comp + n_twin:])
    assert shortened > 10


def test_router_gates_train_through_the_unets_use_of_each_prompts_route(toy):
    """``gate_input="router"``: one compose step's gradient reaches the shared router (through the text
    encoder's and the UNet's scopes), every scope's bias, and no model weight."""
    cfg = TrainConfig(**{**RECIPE, "gate_input": "router"})
    with _one_compose_step(toy, cfg) as (mix, _, frozen):
        assert all(p.grad is None for p in frozen)
        assert mix.routes.misses == 0  # every UNet row found its prompt's route
        router = mix.gates["router"].weight.grad
        assert router is not None and float(router.abs().sum()) > 0
        for comp in ("unet:", "te:"):
            scopes = [s for s in mix.scopes if s.startswith(comp)]
            assert scopes and all(mix.scope_gate(s).bias.grad is not None for s in scopes), comp
            assert sum(float(mix.scope_gate(s).bias.grad.abs().sum()) for s in scopes) > 0, comp


def test_cli_trains_router_gates_and_samples_with_them(toy, tmp_path):
    world = toy[0]
    refs = world.write_reference_folder(tmp_path / "refs", CONCEPTS, n=2)
    loras = [f"--lora={p}" for p in world.expert_paths(CONCEPTS)]
    out = tmp_path / "router.safetensors"
    common = ["--base", str(world.pipeline_dir), *loras]
    args = ["train", *common, "--images", str(refs), "--out", str(out), "--objective", "compose", "--clip-arch", "toy",
            "--clip-model", str(world.clip_path), "--compose-prompt", "a purple striped star on black",
            "--base-prompt", "a red circle on grey", "--gate-family", "sigmoid", "--gate-input", "router",
            "--granularity", "network", "--steps", "2", "--batch-size", "2", "--resolution", "32",
            "--rollout-steps", "2"]
    bad = _cli(*args)  # the router lives in the text encoder: refused before the model loads
    assert bad.returncode == 2 and "needs `train_text_gates`" in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
    assert not out.exists()
    r = _cli(*args, "--train-text-gates")
    assert r.returncode == 0, r.stderr[-2000:]
    gf = mole.read_gate_file(out)
    assert gf.config.gate_input == "router" and gf.info["version"] == 3 and gf.components() == ["te", "unet"]
    s = _cli("sample", *common, "--gates", str(out), "--prompt", "a purple star on grey", "--size", "32",
             "--steps", "2", "--out", str(tmp_path / "samples"))
    assert s.returncode == 0, s.stderr[-2000:]
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_naming_term_by_hand_and_its_errors(toy):
    world, pipe, backend, experts, refs, prompts, guide = toy
    cfg = TrainConfig(**{**RECIPE, "gate_input": "router", "route_weight": 2.0})
    mix = mole.attach(pipe, experts, cfg.gate_config())
    try:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            mix.gates["router"].weight.copy_(torch.randn(mix.gates["router"].weight.shape, generator=g))
        emb = reference_embeddings(guide, [to_tensor(load_image(r), 32) for r in refs], [r.concept for r in refs])
        obj = ComposeObjective(cfg, backend, [mix], guide, prompts, emb, latent_shape(backend, 32))
        assert obj.expert_concepts == CONCEPTS  # purple.safetensors ↔ purple, …
        texts = ["a purple star on grey", "a red circle on grey"]
        with torch.no_grad():
            obj._encode(texts)
            logits = obj._route.clone()
            target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
            by_hand = (torch.log1p(torch.exp(-logits.abs())) + logits.clamp_min(0) - target * logits).mean()
            torch.testing.assert_close(obj._naming(texts), by_hand)
        with pytest.raises(mole.MoleError, match="no LoRA is named after a concept"):
            ComposeObjective(cfg, backend, [mix], guide, prompts, {"cat": emb["purple"]}, latent_shape(backend, 32))
    finally:
        mix.detach()
    with pytest.raises(mole.MoleError, match="`route_weight` must be ≥ 0 and needs `gate_input` router"):
        TrainConfig(**{**RECIPE, "route_weight": 1.0})


def test_trigger_gates_train_keyed_on_each_loras_word_and_route_by_it(toy):
    """``gate_input="trigger"`` through the engine: every LoRA's key is its file's word (purple.safetensors ↔
    purple), the naming term and the guidance train only the thresholds and magnitudes, and the trained file
    runs each LoRA for prompts that name its word — held-out words included — and none for prompts that do not."""
    world, pipe, backend, experts, refs, prompts, guide = toy
    cfg = TrainConfig(**{**RECIPE, "gate_input": "trigger", "granularity": "block", "route_weight": 1.0, "steps": 3})
    gf = train(cfg, backend, experts, refs, compose_prompts=prompts, guide=guide).gates
    assert gf.info["version"] == 4 and gf.components() == ["te", "unet"]
    keys = gf.tensors["router.weight"]
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(3))
    for name in gf.scopes:  # the scopes' own biases stay at 0: no scope can switch a LoRA on by itself
        assert torch.equal(gf.tensors[f"gates.{name}.bias"], torch.zeros(3))
    mix = mole.attach(pipe, experts, gates=gf)
    try:
        texts = ["a yellow striped cross on white", "a purple star on grey", "a blue dotted triangle on white"]
        with torch.no_grad():
            cond = backend.encode_prompts(texts)
            backend.predict(torch.zeros(3, *latent_shape(backend, 32)), torch.full((3,), 500), cond)
        named = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
        for s in mix.scopes:
            share = mix.live_gates[s] / mix.scope_gate(s).magnitude.detach()
            # 3 steps barely move the thresholds from cosine 0.5: 'yellow', a colour never seen, is purple's nearest
            assert (share[named] > 0.95).all() and (share[~named] < 0.15).all(), (s, share)
    finally:
        mix.detach()
    with warnings.catch_warnings():  # the heatmap statistics re-encode each caption: every UNet row is routed
        warnings.simplefilter("error", mole.MoleWarning)
        stats = gate_statistics(backend, experts, gf, reference_cache(backend, experts, refs, cfg))
    assert any(s.startswith("unet:") for s in stats["mean"])


def test_trigger_gates_with_frozen_magnitudes_train_only_the_router(toy):
    """``train_magnitudes=False``: every scope's magnitude stays at its start (1, the LoRA's own strength) bit for
    bit, while the router's thresholds learn; with the magnitudes trained (same seed) they move."""
    world, pipe, backend, experts, refs, prompts, guide = toy
    base = {**RECIPE, "gate_input": "trigger", "granularity": "block", "route_weight": 1.0, "steps": 3}
    frozen = train(TrainConfig(**base, train_magnitudes=False), backend, experts, refs, compose_prompts=prompts,
                   guide=guide).gates
    trained = train(TrainConfig(**base), backend, experts, refs, compose_prompts=prompts, guide=guide).gates
    start = torch.zeros(3)  # logit of 1 / m_max = 0.5
    for name in frozen.scopes:
        assert torch.equal(frozen.tensors[f"gates.{name}.magnitude_logit"], start), name
    assert any(not torch.equal(trained.tensors[f"gates.{name}.magnitude_logit"], start) for name in trained.scopes)
    assert not torch.equal(frozen.tensors["router.bias"], -10.0 * 0.5 * torch.ones(3))  # the thresholds moved
    with pytest.raises(mole.MoleError, match="`train_magnitudes` off needs gate_family sigmoid"):
        TrainConfig(**{**base, "gate_family": "softmax", "gate_input": "prompt", "route_weight": 0.0},
                    train_magnitudes=False)


def test_cli_trains_trigger_gates_and_samples_with_them(toy, tmp_path):
    world = toy[0]
    refs = world.write_reference_folder(tmp_path / "refs", CONCEPTS, n=2)
    loras = [f"--lora={p}" for p in world.expert_paths(CONCEPTS)]
    out = tmp_path / "trigger.safetensors"
    common = ["--base", str(world.pipeline_dir), *loras]
    args = ["train", *common, "--images", str(refs), "--out", str(out), "--objective", "compose", "--clip-arch", "toy",
            "--clip-model", str(world.clip_path), "--compose-prompt", "a purple striped star on black",
            "--base-prompt", "a red circle on grey", "--gate-input", "trigger", "--train-text-gates",
            "--granularity", "block", "--steps", "2", "--batch-size", "2", "--resolution", "32", "--rollout-steps", "2"]
    bad = _cli(*args)  # softmax gates cannot switch a LoRA off: refused before the model loads
    assert bad.returncode == 2 and "needs the sigmoid gate family" in bad.stderr and bad.stderr.count("\n") == 1, \
        bad.stderr
    assert not out.exists()
    r = _cli(*args, "--gate-family", "sigmoid", "--route-weight", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    gf = mole.read_gate_file(out)
    assert gf.config.gate_input == "trigger" and gf.info["version"] == 4
    s = _cli("sample", *common, "--gates", str(out), "--prompt", "a purple star on grey", "--size", "32",
             "--steps", "2", "--out", str(tmp_path / "samples"))
    assert s.returncode == 0, s.stderr[-2000:]
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1
