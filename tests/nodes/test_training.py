"""MoLE Train Gates in-process: the comfy backend's maths against ComfyUI's own, the private model copy,
wait/background jobs, ComfyUI's Cancel, cancel during save, resume and bad inputs."""

from __future__ import annotations

import math
import os
import threading
import time

import pytest
import torch

from tests.nodes._helpers import comfyui_nodes, lora_loader, sample
from tests.nodes._nodes import apply, load_gates, rel, train_and_measure
from tests.nodes.testing_pack.tiny_comfy import tiny_model
from train.backend import add_noise

pytestmark = [pytest.mark.comfy, pytest.mark.slow]


def train_node(mole, tiny, vae, experts, images, name, run="wait", **kw):
    """MoLE Train Gates as the executor calls it (under inference mode)."""
    model, clip = tiny
    args = dict(model=model, clip=clip, vae=vae, experts=experts, images=images, prompts="a photo of a ball",
                steps=6, lr=0.05, alpha=0.5, granularity="block", gate_input="input", objective="denoise", seed=0,
                name=name, run=run, resolution=64, batch_size=2)
    args.update(kw)
    with torch.inference_mode():
        return mole.train_node.MoleTrainGates.execute(**args)


def last_job(mole):
    return max(mole.jobs.worker().jobs(), key=lambda j: j.created)


def wait_done(mole, job, timeout: float = 120.0):
    return mole.jobs.worker().wait(job.id, timeout=timeout)


# ----- the backend's maths -----
def test_schedule_is_the_sd_schedule_and_vp_noise_is_comfy_noise(mole, tiny):
    from diffusers import DDPMScheduler

    base = tiny[0].model
    sigmas, alphas = mole.comfy_backend.schedule(base)
    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.float()
    assert torch.allclose(alphas, sd, rtol=1e-5, atol=1e-7)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    vp = add_noise(alphas, x0, eps, t)
    ve = base.model_sampling.noise_scaling(sigmas[t], eps, x0)
    assert torch.allclose(vp / alphas[t].sqrt().view(-1, 1, 1, 1), ve, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["EPS", "V_PREDICTION"])
def test_predicted_noise_is_exact_for_eps_and_v_models(mole, kind):
    """ε̂ of the backend = the raw UNet's ε (EPS) or √ᾱ v + √(1−ᾱ) x_t (v), and = ComfyUI's own
    sampler maths (x_VE − apply_model(x_VE, σ)) / σ on the shared model."""
    import comfy.model_base

    with torch.inference_mode():
        model = tiny_model(0, model_type=comfy.model_base.ModelType[kind])
        copy_ = mole.comfy_backend.private_copy(model, 0)
    backend = mole.comfy_backend.ComfyBackend(copy_)
    gen = torch.Generator().manual_seed(1)
    x0, eps, ctx = (torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen),
                    torch.randn(3, 7, 32, generator=gen))
    t = torch.tensor([10, 400, 900])
    x_t = add_noise(backend.alphas_cumprod, x0, eps, t)
    a = backend.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        got = backend.predict(x_t, t, {"c_crossattn": ctx})
        raw = copy_.diffusion_model(x_t, t.float(), context=ctx)  # the UNet sees c_in · x_VE = x_t at step t
    want = raw if kind == "EPS" else a.sqrt() * raw + (1 - a).sqrt() * x_t
    assert rel(got, want) < 1e-4
    sigma = backend.sigmas[t]
    with torch.inference_mode():
        x_ve = model.model.model_sampling.noise_scaling(sigma, eps, x0)
        den = model.model.apply_model(x_ve, sigma, c_crossattn=ctx)
    assert rel(got, (x_ve - den) / sigma.view(-1, 1, 1, 1)) < 1e-4


def test_latents_and_conditioning_equal_comfyui_nodes(mole, tiny, vae, experts, images, files):
    comfy_nodes = comfyui_nodes()

    model, clip = tiny
    cb = mole.comfy_backend
    with torch.inference_mode():
        encoder = cb.ComfyEncoder(model.model, vae, clip, 64)
        latents = encoder.encode_images(images.movedim(-1, 1) * 2 - 1)
        want = comfy_nodes.VAEEncode().encode(vae, images)[0]["samples"] * model.model.latent_format.scale_factor
        assert torch.allclose(latents, want, atol=1e-5)
        cond = encoder.encode_prompts(["a photo of a ball"])["c_crossattn"]
        assert torch.equal(cond, comfy_nodes.CLIPTextEncode().encode(clip, "a photo of a ball")[0][0][0])
        nla = mole.train_node.nla_clip(clip, experts)  # text-encoder parts at 1/N, like chained LoraLoaders
        _, chained = lora_loader(model, clip, files["a"], 0.0, 0.5)
        _, chained = lora_loader(model, chained, files["b"], 0.0, 0.5)
        got = cb.ComfyEncoder(model.model, vae, nla, 64).encode_prompts(["a ball"])["c_crossattn"]
        want = comfy_nodes.CLIPTextEncode().encode(chained, "a ball")[0][0][0]
        assert rel(got, want) < 1e-5 and rel(got, cond) > 1e-3


def test_private_copy_is_normal_independent_and_hook_free(mole, tiny):
    model = tiny[0]
    handle = model.model.diffusion_model.out[2].register_forward_hook(lambda m, a, o: o)  # another extension's hook
    try:
        with torch.inference_mode():
            copy_ = mole.comfy_backend.private_copy(model, 0)
    finally:
        handle.remove()
    shared = dict(model.model.named_parameters())
    for name, p in copy_.named_parameters():
        assert shared[name].is_inference() and not p.is_inference() and not p.requires_grad, name
        assert p.data_ptr() != shared[name].data_ptr() and torch.equal(p, shared[name]), name
    assert not any(m._forward_hooks for m in copy_.modules()) and copy_.current_patcher is None


def test_a_weight_sharing_copy_uses_the_loaded_weights_until_it_gets_its_own(mole, tiny):
    """``wait`` mode's copy: normal-mode parameters on the shared model's memory (no second copy of the weights),
    usable for backward; :func:`own_weights` then gives it its own, equal ones (a stopped job kept to resume)."""
    model = tiny[0]
    with torch.inference_mode():
        copy_ = mole.comfy_backend.private_copy(model, 0, share_weights=True)
    shared = dict(model.model.named_parameters())
    for name, p in copy_.named_parameters():
        assert shared[name].is_inference() and not p.is_inference() and not p.requires_grad, name
        assert p.data_ptr() == shared[name].data_ptr(), name
    assert not any(m._forward_hooks for m in copy_.modules()) and copy_.current_patcher is None
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    cond = torch.randn(1, 7, 32)
    copy_.diffusion_model(x, torch.tensor([10.0]), context=cond).sum().backward()  # weights saved for backward
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert mole.comfy_backend.own_weights(copy_, torch.device("cpu"))
    for name, p in copy_.named_parameters():
        assert p.data_ptr() != shared[name].data_ptr() and torch.equal(p, shared[name]) and not p.is_inference(), name


@pytest.mark.parametrize("gate_input", ["input", "prompt"])
def test_training_lowers_the_denoise_loss(mole, tiny, vae, experts, images, gate_input):
    model, clip = tiny
    before, after, _ = train_and_measure(mole, model, clip, vae, experts, images, gate_input=gate_input)
    print(f"\ndenoise loss on the references ({gate_input} gates): uniform gates {before:.5f} → trained {after:.5f}")
    assert after < before


# ----- jobs through the node -----
def test_wait_mode_trains_writes_the_file_and_leaves_the_shared_model_untouched(mole, tiny, vae, experts, images,
                                                                                   comfy_dirs, base_out):
    out = train_node(mole, tiny, vae, experts, images, "wait/run1")
    gates, curves = out.args
    job = last_job(mole)
    assert job.status == "done" and len(job.history) == 6 and curves.shape[-1] == 3
    assert out.ui["mole_job"][0]["id"] == job.id and out.ui["mole_job"][0]["file"] == "wait/run1.safetensors"
    saved = load_gates(mole, "wait/run1.safetensors")
    assert saved.gate_file.info["calibration"]["mean"] and saved.gate_file.info["training"]["steps_done"] == 6
    assert torch.equal(saved.gate_file.tensors["gates.unet:mid_block.attentions.0.weight"],
                       gates.gate_file.tensors["gates.unet:mid_block.attentions.0.weight"])
    assert job.result["file"] == "wait/run1.safetensors" and jobs_spec(mole, job).model is None  # copy released
    m, _, _ = apply(mole, tiny[0], experts, "gated", gates=saved)
    with torch.inference_mode():
        mixed, base = sample(m), sample(tiny[0])
    assert torch.isfinite(mixed).all() and rel(mixed, base) > 1e-4
    assert torch.equal(base, base_out)  # the shared model is bit-exact after training and MoLE sampling
    with torch.inference_mode():
        vis = mole.gates.MoleVisualizeGates.execute(gates=gates, by_timestep=True, scale=1)
    payload = vis.ui["mole_gates"][0]
    assert payload["experts"] == ["a.safetensors", "b.safetensors"] and "t 100" in payload["bucket_labels"].values()


def jobs_spec(mole, job):
    return mole.jobs.spec_of(job)


def test_background_returns_at_once_while_the_shared_model_keeps_sampling(mole, tiny, vae, experts, images,
                                                                          comfy_dirs, base_out):
    events: list[tuple[str, dict]] = []
    mole.jobs.worker().subscribe(lambda kind, payload: events.append((kind, payload)))
    t0 = time.perf_counter()
    out = train_node(mole, tiny, vae, experts, images, "bg/run1", run="background", steps=8)
    returned = time.perf_counter() - t0
    job = last_job(mole)
    gates = out.args[0]
    assert job.id in gates.source and gates.gate_file.info["training"]["steps_done"] == 0
    outputs = []
    while job.status in ("queued", "running"):
        with torch.inference_mode():
            outputs.append(sample(tiny[0]))  # another "prompt" on the same model while the job trains
    assert wait_done(mole, job).status == "done", job.error
    print(f"\nbackground node returned in {returned:.2f} s; {len(outputs)} samplings of the shared model meanwhile")
    assert outputs and all(torch.equal(o, base_out) for o in outputs)
    progress = [p for k, p in events if k == "progress" and p["job"] == job.id]
    assert [p["step"] for p in progress] == list(range(1, 9)) and {"loss", "gate_entropy", "mean_gates",
                                                                      "eta_s"} <= set(progress[-1])
    assert (comfy_dirs["mole_gates"] / "bg" / "run1.safetensors").is_file()


def test_comfy_cancel_in_wait_mode_stops_within_a_step_and_keeps_the_checkpoint(mole, tiny, vae, experts, images,
                                                                                 comfy_dirs):
    import comfy.model_management as mm

    from train.checkpoint import read_checkpoint

    box: dict = {}

    def run() -> None:
        try:
            train_node(mole, tiny, vae, experts, images, "wait/cancelled", steps=400)
        except BaseException as exc:  # noqa: BLE001 (the test inspects it)
            box["exc"] = exc
        box["t"] = time.perf_counter()
    thread = threading.Thread(target=run)
    thread.start()
    job = None
    while job is None or job.status != "running" or len(job.history) < 3:
        time.sleep(0.02)
        job = last_job(mole) if mole.jobs.worker().jobs() else None
    step_time = job.progress["elapsed_s"] / (job.progress["step"] - 0)
    t0 = time.perf_counter()
    mm.interrupt_current_processing(True)
    thread.join(60)
    latency = box["t"] - t0
    print(f"\nComfyUI Cancel → node raised in {latency:.2f} s (one training step ≈ {step_time:.2f} s)")
    assert isinstance(box.get("exc"), mm.InterruptProcessingException) and not mm.processing_interrupted()
    assert job.status == "cancelled" and latency < 2 * step_time + 1.0
    state = read_checkpoint(job.checkpoint)
    assert state.step == job.history[-1]["step"] < 400
    assert not (comfy_dirs["mole_gates"] / "wait" / "cancelled.safetensors").exists()
    assert jobs_spec(mole, job).model is not None  # parked for a resume
    shared = {p.data_ptr() for p in tiny[0].model.parameters()}  # wait mode trained on the loaded weights; parked,
    assert not jobs_spec(mole, job).shares_weights  # the copy has its own: other prompts may patch the shared ones
    assert not shared & {p.data_ptr() for p in jobs_spec(mole, job).model.parameters()}


def test_cancel_during_save_leaves_no_file_and_resume_finishes(mole, tiny, vae, experts, images, comfy_dirs,
                                                               monkeypatch):
    import mole_core

    original = mole_core.write_gate_file
    calls = []

    def cancel_while_writing(gf, path):
        calls.append(path)
        out = original(gf, path)
        if len(calls) == 1:
            mole.jobs.cancel(last_job(mole).id)  # the cancel arrives while the file is being written
        return out
    monkeypatch.setattr(mole_core, "write_gate_file", cancel_while_writing)
    train_node(mole, tiny, vae, experts, images, "save/race", run="background", steps=4)
    job = last_job(mole)
    assert wait_done(mole, job).status == "cancelled" and job.result["file"] is None
    folder = comfy_dirs["mole_gates"]
    assert not (folder / "save" / "race.safetensors").exists()
    leftovers = [p.name for p in (folder / ".checkpoints").iterdir() if "race" in p.name]
    assert leftovers == [job.checkpoint.rsplit("/", 1)[-1]], leftovers  # only the checkpoint, no partial file
    mole.jobs.resume(job.id)
    assert wait_done(mole, job).status == "done" and (folder / "save" / "race.safetensors").is_file()
    assert [h["step"] for h in job.history] == [1, 2, 3, 4]
    assert load_gates(mole, "save/race.safetensors").gate_file.info["training"]["steps_done"] == 4


def test_stop_and_save_finishes_early_with_a_file(mole, tiny, vae, experts, images, comfy_dirs):
    train_node(mole, tiny, vae, experts, images, "early/stop", run="background", steps=400)
    job = last_job(mole)
    while job.status != "running" or len(job.history) < 2:
        time.sleep(0.02)
    mole.jobs.finish(job.id)
    assert wait_done(mole, job).status == "done"
    steps_done = load_gates(mole, "early/stop.safetensors").gate_file.info["training"]["steps_done"]
    assert 2 <= steps_done < 400


# ----- errors -----
@pytest.mark.parametrize("change, message", [
    ({"images": torch.zeros(0, 64, 64, 3)}, "the reference image batch is empty"),
    ({"prompts": "one\ntwo\nthree"}, "got 3 prompts for 4 images"),
    ({"prompts": "  \n "}, "`prompts` is empty"),
    ({"steps": 0}, "`steps` must be > 0"),
    ({"name": "../escape"}, "must be a file name inside models/mole_gates"),
    ({"name": "x" * 300}, "`name`"),
    ({"name": "a\x00b"}, "`name`"),
    ({"objective": "denoise + clip"}, "needs `clip_guide`"),
])
def test_bad_inputs_raise_one_line_errors(mole, tiny, vae, experts, images, change, message):
    import mole_core

    jobs_before = len(mole.jobs.worker().jobs())
    args = {"images": images, "name": "bad", **change}
    with pytest.raises(mole_core.MoleError, match=message):
        train_node(mole, tiny, vae, experts, **args)
    assert len(mole.jobs.worker().jobs()) == jobs_before


def test_validation_refuses_path_traversal(mole):
    node = mole.train_node.MoleTrainGates
    assert "no '..'" in node.validate_inputs(name="../x")
    assert node.validate_inputs(name="sub/ok") is True


def test_unsupported_models_are_refused(mole, tiny, vae, experts, images):
    import comfy.model_base

    import mole_core

    with torch.inference_mode():
        flow = tiny_model(0, model_type=comfy.model_base.ModelType.FLOW)
    with pytest.raises(mole_core.MoleError, match="flow models are not supported"):
        train_node(mole, (flow, tiny[1]), vae, experts, images, "bad")
    gated, _, _ = apply(mole, tiny[0], experts, "gated")
    with pytest.raises(mole_core.MoleError, match="already carries a gated MoLE"):
        train_node(mole, (gated, tiny[1]), vae, experts, images, "bad")


def test_job_control_errors(mole, tiny, vae, experts, images, comfy_dirs):
    train_node(mole, tiny, vae, experts, images, "control/done", run="background", steps=2)
    done = wait_done(mole, last_job(mole))
    assert done.status == "done"
    with pytest.raises(ValueError, match="only a running job can be stopped and saved"):
        mole.jobs.finish(done.id)
    with pytest.raises(KeyError):
        mole.jobs.resume("no-such-job")
    with pytest.raises(KeyError):
        mole.jobs.state("no-such-job")
    with pytest.raises(ValueError, match="only queued or running jobs can be cancelled"):
        mole.jobs.cancel(done.id)
    with pytest.raises(ValueError, match="only cancelled or failed jobs can be resumed"):
        mole.jobs.resume(done.id)


def test_failing_job_reports_its_error_and_the_worker_keeps_going(mole, tiny, vae, experts, images, comfy_dirs):
    clip_dir = comfy_dirs["mole_gates"].parent / "mole_clip"
    clip_dir.mkdir(exist_ok=True)
    (clip_dir / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    import folder_paths

    folder_paths.add_model_folder_path("mole_clip", str(clip_dir))
    train_node(mole, tiny, vae, experts, images, "fail/clip", run="background", objective="denoise + clip",
               clip_guide="broken.safetensors")
    job = last_job(mole)
    assert wait_done(mole, job).status == "failed" and "broken.safetensors" in job.error
    assert "\n" not in job.error and mole.jobs.state(job.id)["error"] == job.error
    train_node(mole, tiny, vae, experts, images, "fail/after", run="background", steps=2)
    assert wait_done(mole, last_job(mole)).status == "done"


def test_apply_with_clip_mixes_text_parts_uniformly_for_unet_only_gates(mole, tiny, experts, comfy_dirs):
    """Gate files from training have UNet gates only: MoLE Apply (gated, with a CLIP) then mixes the
    text-encoder parts at 1/N, exactly as the trainer encoded the prompts."""
    import mole_core
    from train.config import TrainConfig

    comfy_nodes = comfyui_nodes()

    model, clip = tiny
    with torch.inference_mode():
        start = mole.train_node.initial_gates(model, experts, TrainConfig())
    mole_core.write_gate_file(start, comfy_dirs["mole_gates"] / "unet_only.safetensors")
    _, c, out = apply(mole, model, experts, "gated", clip=clip, gates=load_gates(mole, "unet_only.safetensors"))
    with torch.inference_mode():
        got = comfy_nodes.CLIPTextEncode().encode(c, "a ball")[0][0][0]
        want = comfy_nodes.CLIPTextEncode().encode(mole.train_node.nla_clip(clip, experts), "a ball")[0][0][0]
    assert torch.equal(got, want) and [h.component for h in out.holders] == ["unet"]


# ----- objective compose -----
COMPOSE = dict(objective="compose", gate_family="sigmoid", gate_input="prompt", alpha=0.0, granularity="network",
               prompts="a red ball\na red ball\na blue ball\na blue ball", concepts="red, blue",
               composition_prompts="a red blue ball\na blue red ball on grass", base_prompts="a ball\na cube")


def test_prompt_table_equals_clip_text_encode_with_and_without_the_loras(mole, tiny, vae, experts, files):
    """The compose objective's conditioning: with the experts' text parts it is CLIPTextEncode on chained
    LoraLoaders at 1/N (NLA), without them CLIPTextEncode on the bare CLIP."""
    from tests.nodes._helpers import encode

    model, clip = tiny
    cb = mole.comfy_backend
    with torch.inference_mode():
        nla = mole.train_node.nla_clip(clip, experts)
        table = cb.PromptTable.encode(cb.ComfyEncoder(model.model, vae, nla, 64),
                                      cb.ComfyEncoder(model.model, vae, clip, 64), ["a red blue ball", ""])
        _, oracle = lora_loader(model, clip, files["a"], 0.0, 0.5)
        _, oracle = lora_loader(model, oracle, files["b"], 0.0, 0.5)
        want_lora, want_base = encode(oracle, "a red blue ball"), encode(clip, "a red blue ball")
    got_lora, got_base = table.lora["a red blue ball"]["c_crossattn"], table.base["a red blue ball"]["c_crossattn"]
    assert (want_lora - want_base).abs().max() > 1e-3  # the LoRAs' text parts change the conditioning
    torch.testing.assert_close(got_lora, want_lora, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_base, want_base, atol=1e-5, rtol=1e-5)
    backend = cb.ComfyBackend(cb.private_copy(model, 0), prompts=table.to(torch.device("cpu")))
    both = backend.encode_prompts(["", "a red blue ball"])["c_crossattn"]
    assert torch.equal(both[1:], table.lora["a red blue ball"]["c_crossattn"])
    import mole_core

    with pytest.raises(mole_core.MoleError, match="was not encoded before training"):
        backend.encode_prompts(["a green ball"])


def test_compose_objective_trains_sigmoid_gates_in_the_node(mole, tiny, vae, experts, images, comfy_dirs, clip_guide):
    out = train_node(mole, tiny, vae, experts, images, "compose/run", steps=3, batch_size=4, **COMPOSE, **clip_guide)
    gates, _ = out.args
    job = last_job(mole)
    assert job.status == "done", job.error
    terms = job.history[-1]["terms"]
    assert set(terms) == {"global", "local", "prior"} and all(v >= 0 for v in terms.values()), terms
    info = gates.gate_file.info
    assert gates.gate_file.config.family == "sigmoid" and info["training"]["objective"] == "compose"
    assert info["training"]["center_features"] is True
    start = mole.train_node.initial_gates(tiny[0], experts, mole.train_node.TrainConfig(
        gate_family="sigmoid", gate_input="prompt", granularity="network"))
    moved = [k for k, v in gates.gate_file.tensors.items() if k.endswith(".weight")
             and not torch.equal(v, start.tensors[k])]
    assert moved, "no router weight moved: the compose loss did not reach the gates"
    saved = load_gates(mole, "compose/run.safetensors")  # loads in MoLE Load Gates and samples
    m, _, _ = apply(mole, tiny[0], experts, "gated", gates=saved)
    with torch.inference_mode():
        assert torch.isfinite(sample(m)).all()


@pytest.mark.parametrize("change, message", [
    ({}, "objective 'compose' needs `clip_guide`"),
    ({"concepts": ""}, "needs `concepts`"),
    ({"composition_prompts": " \n"}, "needs `composition_prompts`"),
    ({"concepts": "red, green"}, "no reference prompt names 'green'"),
    ({"prompts": "a red blue ball"}, "names several concepts"),
    ({"concepts": "red ball"}, "is not one word"),
])
def test_compose_inputs_are_checked_before_any_work(mole, tiny, vae, experts, images, comfy_dirs, clip_guide,
                                                    change, message):
    import mole_core

    args = {**COMPOSE, **({} if not change else clip_guide), **change}
    jobs_before = len(mole.jobs.worker().jobs())
    with pytest.raises(mole_core.MoleError, match=message):
        train_node(mole, tiny, vae, experts, images, "bad", **args)
    assert len(mole.jobs.worker().jobs()) == jobs_before


def test_after_a_restart_the_job_is_listed_interrupted_and_queuing_the_node_again_continues_it(
        mole, tiny, vae, experts, images, comfy_dirs, monkeypatch):
    train_node(mole, tiny, vae, experts, images, "restart/r", run="background", steps=40)
    job = last_job(mole)
    end = time.time() + 120
    while (job.progress or {}).get("step", 0) < 3 and time.time() < end:
        time.sleep(0.02)
    mole.jobs.cancel(job.id)
    assert wait_done(mole, job).status == "cancelled"
    stopped_at, state_file = job.progress["step"], job.checkpoint
    assert 3 <= stopped_at < 40 and os.path.isfile(state_file)

    # a restart: the server's jobs and parked model copies are gone, the checkpoint folder is not
    monkeypatch.setattr(mole.jobs, "_worker", None)
    monkeypatch.setattr(mole.jobs, "_parked", [])
    listed = [j for j in mole.jobs.list_jobs() if j["file"] == "restart/r.safetensors"]
    assert [j["status"] for j in listed] == ["interrupted"] and listed[0]["progress"]["step"] == stopped_at
    with pytest.raises(ValueError, match="queue MoLE Train Gates again"):
        mole.jobs.resume(listed[0]["id"])
    assert mole.jobs.state(listed[0]["id"])["checkpoint"] == os.path.basename(state_file)

    train_node(mole, tiny, vae, experts, images, "restart/r", run="wait", steps=40, seed=1)  # other settings
    assert [h["step"] for h in last_job(mole).history][:1] == [1] and os.path.isfile(state_file)
    train_node(mole, tiny, vae, experts, images, "restart/r", run="wait", steps=40)
    again = last_job(mole)
    assert again.status == "done" and again.checkpoint == state_file
    assert [h["step"] for h in again.history] == list(range(stopped_at + 1, 41))
    assert not os.path.exists(state_file)  # deleted once the gate file is in place
    assert (comfy_dirs["mole_gates"] / "restart" / "r.safetensors").is_file()
    assert not [j for j in mole.jobs.list_jobs() if j["file"] == "restart/r.safetensors" and j["status"] != "done"]


def test_comfyui_model_sampling_discrete_v_prediction_patch_is_honoured(mole):
    """An ε checkpoint patched the way ComfyUI's ModelSamplingDiscrete node (v_prediction) patches it, as users do
    for SD2.x-v and v-pred SDXL finetunes: the private copy trains on the patched parameterisation.

    The patch is built from ComfyUI's core ``comfy.model_sampling`` exactly as the node's ``patch`` does (a
    ``ModelSamplingDiscrete`` + ``V_PREDICTION`` object patched in as ``model_sampling``): the node's module
    imports the top-level name ``nodes``, which this repository's ``nodes/`` package must never be confused with."""
    import comfy.model_sampling as ms

    class VPrediction(ms.ModelSamplingDiscrete, ms.V_PREDICTION):
        pass

    with torch.inference_mode():
        model = tiny_model(0)
        patched = model.clone()
        patched.add_object_patch("model_sampling", VPrediction(model.model.model_config, zsnr=False))
        copy_ = mole.comfy_backend.private_copy(patched, 0)
    backend = mole.comfy_backend.ComfyBackend(copy_)
    gen = torch.Generator().manual_seed(2)
    x0, eps, ctx = (torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen),
                    torch.randn(2, 7, 32, generator=gen))
    t = torch.tensor([100, 800])
    x_t = add_noise(backend.alphas_cumprod, x0, eps, t)
    a = backend.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        got = backend.predict(x_t, t, {"c_crossattn": ctx})
        raw = copy_.diffusion_model(x_t, t.float(), context=ctx)
    assert rel(got, a.sqrt() * raw + (1 - a).sqrt() * x_t) < 1e-4  # v → ε, not the unpatched ε reading
    assert rel(got, raw) > 1e-2


def test_train_gates_on_a_v_prediction_model_writes_gates_that_load(mole, tiny, vae, experts, images):
    import comfy.model_base

    with torch.inference_mode():
        v_model = tiny_model(0, model_type=comfy.model_base.ModelType.V_PREDICTION)
    train_node(mole, (v_model, tiny[1]), vae, experts, images, "vpred/run", run="wait", steps=4)
    job = last_job(mole)
    assert job.status == "done" and all(math.isfinite(h["loss"]) for h in job.history)
    saved = load_gates(mole, "vpred/run.safetensors")
    assert saved.gate_file.info["training"]["steps_done"] == 4
    m, _, _ = apply(mole, v_model, experts, "gated", gates=saved)
    with torch.inference_mode():
        assert torch.isfinite(sample(m)).all()
