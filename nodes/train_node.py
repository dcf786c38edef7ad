"""MoLE Train Gates: learn the gates from reference images on a private model copy in a background worker
(``wait`` mode: the copy shares the loaded model's weights, see :func:`.comfy_backend.private_copy`).

The node prepares everything in the prompt thread (ComfyUI's own VAE/CLIP encoding, the private model
copy, normal-mode tensors; see :mod:`.comfy_backend`) and hands a job to the server-wide worker of
:mod:`.jobs`. ``wait`` keeps the node running with a progress bar and honours ComfyUI's Cancel;
``background`` returns at once and leaves the queue free.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
import uuid
from typing import Any

import comfy.model_management as mm
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui

import mole_core
from mole_core.gate_file import GateFile
from mole_core.gates import FAMILIES, GATE_INPUTS, ROUTED_INPUTS
from mole_core.naming import GRANULARITIES
from mole_core.paths import path_inside

from ..train.compose import ComposePrompts, named_concepts, twin_prompt
from ..train.config import TrainConfig
from ..train.data import Reference, references_from_images
from ..train.engine import prepare_references
from ..train.plots import training_curves
from ..train.recipes import recipe_config, recipe_fields
from . import jobs, saved_states
from .apply import TE, static_clip, static_vector
from .comfy_backend import (
    ComfyEncoder,
    PromptTable,
    cache_to,
    check_trainable,
    private_copy,
    private_module,
    training_memory,
    unify_context,
)
from .comfy_index import build_index
from .comfy_text import PrivateTextEncoder
from .common import check_relative_name, node_id
from .gates import gate_path_for_save
from .types import ExpertsIO, GatesIO, MoleExperts, MoleGates

log = logging.getLogger(__name__)

RUN_MODES = ("background", "wait")
OBJECTIVES = {"denoise": "denoise", "denoise + clip": "denoise,clip", "compose": "compose"}
CLIP_FOLDER = "mole_clip"
NONE = "None"
POLL_S = 0.05


def register_clip_folder() -> None:
    """``models/mole_clip``: open_clip ``.safetensors`` checkpoints for the CLIP objective."""
    folder_paths.add_model_folder_path(CLIP_FOLDER, os.path.join(folder_paths.models_dir, CLIP_FOLDER),
                                       is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[CLIP_FOLDER]
    folder_paths.folder_names_and_paths[CLIP_FOLDER] = (paths, {".safetensors"})


CUSTOM = "custom"
RECIPE_CHOICES = (CUSTOM, "compose")


def node_config(recipe: str, **inputs: Any) -> TrainConfig:
    """The job's :class:`TrainConfig` from the node's inputs: ``custom`` takes them as they are (router and
    trigger gates train the text encoders' gates too, objective compose centres the gates' features); a named
    recipe (:mod:`train.recipes`) sets its fields and keeps only the run's size and seed from the inputs."""
    steps = inputs["steps"]
    run = {"warmup_steps": min(10, steps // 10), "checkpoint_every": max(1, steps // 20)}
    if recipe != CUSTOM:
        decided = recipe_fields(recipe)  # explicit fields would win over the recipe's: pass only the others
        return recipe_config(recipe, **{k: v for k, v in inputs.items() if k not in decided}, **run)
    return TrainConfig(**inputs, **run, center_features=inputs["objective"] == "compose",
                       train_text_gates=inputs["gate_input"] in ROUTED_INPUTS)


# ----- preparation (prompt thread) -----
def split_prompts(text: str, field: str = "prompts") -> list[str]:
    """One prompt per non-empty line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines and field == "prompts":
        raise mole_core.MoleError("`prompts` is empty: write one prompt for all images, or one line per image")
    return lines


def split_concepts(text: str) -> list[str]:
    """Trigger words, comma- or newline-separated."""
    return [w.strip() for w in (text or "").replace("\n", ",").split(",") if w.strip()]


def assign_concepts(refs: list[Reference], concepts: list[str]) -> None:
    """Set each reference's concept to the one trigger word its prompt names (objective compose: the local
    term compares images with their named concepts' references). One-line errors when a concept has no
    reference image or a reference prompt names several concepts."""
    bad = [c for c in concepts if not re.fullmatch(r"[\w-]+", c)]
    if bad:
        raise mole_core.MoleError(f"`concepts`: {bad[0]!r} is not one word (write each LoRA's trigger word, "
                                  "comma-separated)")
    for i, ref in enumerate(refs):
        named = named_concepts(ref.caption, concepts)
        if len(named) > 1:
            raise mole_core.MoleError(f"reference {i + 1}'s prompt names several concepts ({', '.join(named)}): "
                                      "give each reference image one concept")
        ref.concept = named[0] if named else ""
    missing = [c for c in concepts if not any(r.concept == c for r in refs)]
    if missing:
        raise mole_core.MoleError(f"`concepts`: no reference prompt names {missing[0]!r} (each concept needs "
                                  "reference images whose prompt contains its trigger word)")


def check_triggers(refs: list[Reference], experts: MoleExperts, concepts: str) -> None:
    """gate_input trigger: each LoRA's key is the concept its file is named after; one-line errors when
    ``concepts`` is empty or names no LoRA file. Sets the references' concepts (objective compose already has)."""
    names = split_concepts(concepts)
    if not names:
        raise mole_core.MoleError("gate_input 'trigger' needs `concepts`: the LoRAs' trigger words, comma-separated")
    if not any(r.concept for r in refs):
        assign_concepts(refs, names)
    if not any(mole_core.trigger_words(experts.experts(), names)):
        raise mole_core.MoleError(f"gate_input 'trigger': no LoRA file is named after one of `concepts` "
                                  f"({', '.join(names)}); name each file after its trigger word "
                                  f"(purple.safetensors ↔ purple), got {', '.join(experts.names)}")


def compose_inputs(refs: list[Reference], composition_prompts: str, base_prompts: str, concepts: str
                   ) -> tuple[ComposePrompts, list[str]]:
    """What objective compose samples, and every prompt it can encode (twins, base, references, empty)."""
    names = split_concepts(concepts)
    if not names:
        raise mole_core.MoleError("objective 'compose' needs `concepts`: the LoRAs' trigger words, comma-separated")
    comps = split_prompts(composition_prompts, "composition_prompts")
    if not comps:
        raise mole_core.MoleError("objective 'compose' needs `composition_prompts`: one prompt per line, each "
                                  "naming two or more concepts")
    assign_concepts(refs, names)
    prompts = ComposePrompts(comps, split_prompts(base_prompts, "base_prompts"))
    everything = [*prompts.compositions, *(twin_prompt(p, names) for p in prompts.compositions), *prompts.base,
                  *(r.caption for r in refs), ""]
    return prompts, everything


def checkpoint_path(file: str) -> str:
    """``models/mole_gates/.checkpoints/<name>.<random>.mole-state`` (never listed as a gate file)."""
    folder = jobs.checkpoint_folder()
    name = f"{saved_states.stem(file)}.{uuid.uuid4().hex[:8]}{saved_states.SUFFIX}"
    path = path_inside(os.path.dirname(folder), f"{os.path.basename(folder)}/{name}", "name", "models/mole_gates")
    os.makedirs(folder, exist_ok=True)
    return path


def nla_clip(clip: Any, experts: MoleExperts) -> Any:
    """The CLIP with the experts' text-encoder parts merged at uniform weights (NLA), as the trainer
    treats them; the input CLIP itself is not changed."""
    if clip is None or not experts.has_component(*TE):
        return clip
    return static_clip(clip, experts, static_vector("uniform", None, [e.enabled for e in experts.entries]))


def initial_gates(model: Any, experts: MoleExperts, cfg: TrainConfig, clip: Any = None) -> GateFile:
    """The untrained gates (the text encoders' too when ``cfg.train_text_gates``: pass ``clip``); building them
    also checks the experts against the model now."""
    text = cfg.train_text_gates and clip is not None
    index = build_index(model=model, clip=clip if text else None)[0]
    mix = mole_core.attach(index, experts.experts(), cfg.gate_config(), components=None if text else ["unet"],
                           hooks=False)
    return mole_core.snapshot(mix, training={**cfg.to_dict(), "steps_done": 0})


def normal_experts(experts: MoleExperts) -> list[mole_core.Expert]:
    """Experts whose factors are normal-mode clones (safe to use in autograd in another thread)."""
    out = []
    with torch.inference_mode(False):
        for e in experts.experts():
            factors = {k: dataclasses.replace(f, down=f.down.clone(), up=f.up.clone()) for k, f in e.factors.items()}
            out.append(dataclasses.replace(e, factors=factors))
    return out


def prepare(model: Any, clip: Any, vae: Any, experts: MoleExperts, images: torch.Tensor, prompts: str,
            cfg: TrainConfig, name: str, mode: str, node: str | None,
            clip_guide: tuple[str, str] | None = None, compose: tuple[str, str, str] = ("", "", "")
            ) -> tuple[jobs.TrainingSpec, GateFile]:
    """Everything a job needs, made in the prompt thread; returns ``(spec, initial gates)``.

    ``compose`` is ``(composition prompts, base prompts, concepts)`` for objective compose: every prompt
    it can draw is encoded here, with the experts' text-encoder parts (NLA) and without (the prior term).

    Raises:
        MoleError: bad name, empty batch, prompt count ≠ image count, unsupported model, experts that
            do not fit the model, missing CLIP guide for the CLIP and compose objectives, compose inputs
            missing or inconsistent.
    """
    file, path = gate_path_for_save(name, "name")
    check_trainable(model)
    needs_guide = {"clip", "compose"} & set(cfg.objectives)
    if needs_guide and clip_guide is None:
        raise mole_core.MoleError(f"objective {'compose' if 'compose' in needs_guide else 'denoise + clip'!r} "
                                  "needs `clip_guide` (an open_clip .safetensors in models/mole_clip)")
    refs = references_from_images(images, split_prompts(prompts))
    compose_prompts, everything = compose_inputs(refs, *compose) if "compose" in cfg.objectives else (None, [])
    if cfg.gate_input == "trigger":
        check_triggers(refs, experts, compose[2])
    start = initial_gates(model, experts, cfg, clip)
    encoder = ComfyEncoder(model.model, vae, nla_clip(clip, experts), cfg.resolution)
    cache = unify_context(prepare_references(encoder, refs, cfg))
    lora = None if cfg.train_text_gates else encoder  # text-gated jobs encode through their CLIP copy instead
    table = (PromptTable.encode(lora, ComfyEncoder(model.model, vae, clip, cfg.resolution), everything)
             .to(model.load_device) if compose_prompts else None)
    shared = mode == "wait"  # nothing else runs until the job ends: train on the loaded weights, no second copy
    text = PrivateTextEncoder(clip) if cfg.train_text_gates else None  # its own weights (see the class)
    copy_ = private_copy(model, training_memory(model, cfg.resolution, cfg.batch_size, not shared), shared)
    vae_model = private_module(vae.first_stage_model, vae.patcher) if needs_guide else None
    normal = normal_experts(experts)
    earlier = saved_states.find_resumable(jobs.checkpoint_folder(), file, [e.sha256 for e in normal], cfg.to_dict(),
                                          jobs.owned_states())
    if earlier is not None:
        log.info("MoLE Train Gates: %s continues from step %d of %d (a checkpoint of an earlier server run)",
                 file, earlier.step, earlier.steps)
    spec = jobs.TrainingSpec(
        file=file, path=path, checkpoint=earlier.path if earlier else checkpoint_path(file), cfg=cfg, experts=normal,
        refs=refs, resume_from=earlier.path if earlier else None,
        cache=cache_to(cache, model.load_device), model=copy_, load_device=model.load_device,
        offload_device=model.offload_device, vae_model=vae_model, vae_scale_factor=encoder.vae_scale_factor,
        clip_guide=clip_guide, compose_prompts=compose_prompts, prompt_table=table, text_encoder=text, node=node,
        mode=mode, shares_weights=shared)
    return spec, start


# ----- waiting (prompt thread) -----
def wait_for(job: Any, steps: int) -> None:
    """Drive a ProgressBar until the job ends; ComfyUI's Cancel stops the job (checkpoint kept) and
    interrupts the prompt."""
    pbar = comfy.utils.ProgressBar(steps)
    try:
        while job.status in ("queued", "running"):
            if mm.processing_interrupted():
                _stop(job)
                mm.throw_exception_if_processing_interrupted()
            p = job.progress or {}
            if p.get("phase") == "block_search":  # after the last step: the bar counts the search's candidates
                pbar.update_absolute(int(p["candidate"]), int(p["candidates"]))
            else:
                pbar.update_absolute(int(p.get("step", 0) or 0), steps)
            time.sleep(POLL_S)
    except mm.InterruptProcessingException:
        _stop(job)
        raise


def _stop(job: Any) -> None:
    if job.status in ("queued", "running"):
        jobs.cancel(job.id)
    jobs.worker().wait(job.id, timeout=600)


def outcome(job: Any) -> GateFile:
    """The trained gates of a finished job, or a one-line error for a failed or cancelled one."""
    if job.status == "failed":
        raise mole_core.MoleError(f"training job {job.id} failed: {job.error}")
    spec = jobs.spec_of(job)
    if job.status != "done" or spec is None or spec.result is None:
        step = job.history[-1].get("step", 0) if job.history else 0
        raise mole_core.MoleError(f"training job {job.id} was cancelled at step {step}; its checkpoint is kept "
                                  "(Resume in the node's panel continues it)")
    return spec.result.gates


def curves_image(history: list[dict]) -> torch.Tensor:
    arr = np.asarray(training_curves(history), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


# ----- the node -----
class MoleTrainGates(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        guides = [NONE, *folder_paths.get_filename_list(CLIP_FOLDER)]
        return io.Schema(
            node_id="MoLE_TrainGates", display_name="MoLE Train Gates", category="MoLE", is_experimental=True,
            is_output_node=True,
            description="Trains the MoLE gates on reference images in a background worker, on a private copy of "
                        "the model (the queue keeps running). wait: the node runs until training ends (progress "
                        "bar, Cancel stops it and keeps the checkpoint) and outputs the trained gates. background: "
                        "returns at once; the gates output then holds the untrained (uniform = NLA) gates, and the "
                        "trained ones are written to models/mole_gates/<name>.safetensors for MoLE Load Gates. "
                        "Same inputs again do not start a second job (change seed or name to retrain).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x or SDXL). Training uses a private "
                                                "copy; this model is not changed."),
                io.Clip.Input("clip", tooltip="Encodes the prompts (the experts' text-encoder parts are applied at "
                                              "uniform weights, once; with gate_input router or trigger they are "
                                              "gated and trained through the job's own copy of this CLIP)."),
                io.Vae.Input("vae", tooltip="Encodes the reference images into latents (the model's own VAE)."),
                ExpertsIO.Input("experts", tooltip="The LoRA experts from MoLE Load Experts (their order is the gate "
                                                   "order)."),
                io.Image.Input("images", tooltip="Reference images (a batch): what the mixture should reproduce. Any "
                                                 "size: resized and centre-cropped to `resolution`."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="One prompt for all images, or one line per image (same order as the batch)."),
                io.Int.Input("steps", default=200, min=1, max=100000,
                             tooltip="Optimizer steps. Gates are small: 100-300 steps are usually enough."),
                io.Float.Input("lr", default=5e-3, min=1e-6, max=1.0, step=1e-4, round=1e-6,
                               tooltip="AdamW learning rate of the gates."),
                io.Float.Input("alpha", default=0.5, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight α of the balance loss (paper Eq. 16): higher keeps every expert in "
                                       "use, 0 lets the gates pick freely."),
                io.Combo.Input("granularity", options=list(GRANULARITIES), default="block",
                               tooltip="One gate per: matrix (layer), layer (transformer layer), block (attention "
                                       "block; the paper's best) or network (one gate for the whole UNet)."),
                io.Combo.Input("gate_input", options=list(GATE_INPUTS), default="input",
                               tooltip="What the gate looks at: input (pooled block input), experts (pooled "
                                       "outputs of the experts, paper Eq. 9-10), prompt (the prompt's "
                                       "conditioning, max-pooled over tokens: routes by the concepts the prompt "
                                       "names), router (a router in the text encoder decides per prompt) or "
                                       "trigger (each LoRA on when the prompt names the word its file is named "
                                       "after). router and trigger also gate and train the LoRAs' text-encoder "
                                       "parts: the job re-encodes prompts through its own copy of the CLIP."),
                io.Combo.Input("objective", options=list(OBJECTIVES), default="denoise",
                               tooltip="denoise: the model's own denoising loss on the references. denoise + clip: "
                                       "plus CLIP image/text similarity of the denoised estimate (needs clip_guide). "
                                       "compose: the paper's V&L recipe: each step samples composition_prompts "
                                       "(a few DDIM steps with CFG) and scores the image against the prompt "
                                       "(global) and the named concepts' reference images (local), and keeps "
                                       "base_prompts close to the model without LoRAs (prior). Needs clip_guide, "
                                       "concepts and composition_prompts; use gate_input prompt and gate_family "
                                       "sigmoid."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of batches, timesteps and noise: same seed and inputs, same gates."),
                io.String.Input("name", default="mole_trained",
                                tooltip="Gate file name in models/mole_gates (sub-folders allowed, no '..'); "
                                        ".safetensors is added. An existing file of that name is replaced when "
                                        "the job finishes."),
                io.Combo.Input("run", options=list(RUN_MODES), default="background",
                               tooltip="background: return at once, train beside the queue (watch and control it in "
                                       "the panel) on a private copy of the model. wait: keep this node running until "
                                       "the gates are trained, on the loaded weights (no second copy in memory)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip="Training resolution in pixels (512 for SD1.x, 1024 for SDXL)."),
                io.Int.Input("batch_size", default=2, min=1, max=64,
                             tooltip="Images per step (more: smoother gradients, more memory)."),
                io.Combo.Input("clip_guide", options=guides, default=NONE, optional=True,
                               tooltip="open_clip .safetensors in models/mole_clip, for objective 'denoise + clip'."),
                io.String.Input("clip_guide_arch", default="ViT-B-32", optional=True,
                                tooltip="open_clip architecture name of clip_guide (e.g. ViT-B-32, ViT-L-14)."),
                io.Combo.Input("gate_family", options=list(FAMILIES), default="softmax", optional=True,
                               tooltip="softmax: the paper's gates (the experts share a total weight of 1). "
                                       "sigmoid: each expert switched on or off on its own, times a learned "
                                       "magnitude (up to 2): can reach every LoRA at full strength and switch "
                                       "unnamed LoRAs off: use it with objective compose."),
                io.String.Input("composition_prompts", multiline=True, default="", optional=True,
                                tooltip="objective compose: one prompt per line, each naming two or more concepts "
                                        "by their trigger words (e.g. 'a purple striped circle on grey')."),
                io.String.Input("base_prompts", multiline=True, default="", optional=True,
                                tooltip="objective compose: prompts that name no concept (one per line): the gated "
                                        "model must draw them as the model without LoRAs does. Optional: the "
                                        "composition prompts without their trigger words serve too."),
                io.String.Input("concepts", default="", optional=True,
                                tooltip="objective compose and gate_input trigger: the LoRAs' trigger words, "
                                        "comma-separated (each LoRA file named after its word). Each reference "
                                        "prompt names one of them (that image is its reference)."),
                io.Combo.Input("recipe", options=list(RECIPE_CHOICES), default=CUSTOM, optional=True,
                               tooltip="custom: the inputs above decide. compose: the recipe the composition "
                                       "benchmark measures best (as `mole-train train --recipe compose`): sigmoid "
                                       "trigger gates on the UNet and text encoder, objective compose, then the "
                                       "block search; it sets objective, gate_family, gate_input, granularity and "
                                       "alpha (those inputs are ignored). Needs clip_guide, concepts, "
                                       "composition_prompts, and each LoRA file named after its trigger word "
                                       "(purple.safetensors ↔ purple). The search takes a while after the last "
                                       "step (the panel counts its candidates)."),
            ],
            outputs=[GatesIO.Output(display_name="gates",
                                    tooltip="wait: the trained gates (with their statistics on the references). "
                                            "background: the untrained uniform gates (the job writes the trained "
                                            "ones to models/mole_gates)."),
                     io.Image.Output(display_name="curves", tooltip="Loss and gate-entropy curves (wait mode).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, name: str) -> bool | str:
        try:
            check_relative_name(name, "name", "models/mole_gates")
        except mole_core.MoleError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, model: Any, clip: Any, vae: Any, experts: MoleExperts, images: torch.Tensor, prompts: str,
                steps: int, lr: float, alpha: float, granularity: str, gate_input: str, objective: str, seed: int,
                name: str, run: str, resolution: int, batch_size: int, clip_guide: str = NONE,
                clip_guide_arch: str = "ViT-B-32", gate_family: str = "softmax", composition_prompts: str = "",
                base_prompts: str = "", concepts: str = "", recipe: str = CUSTOM) -> io.NodeOutput:
        for field, value, options in (("run", run, RUN_MODES), ("objective", objective, tuple(OBJECTIVES)),
                                      ("recipe", recipe, RECIPE_CHOICES)):
            if value not in options:
                raise mole_core.MoleError(f"`{field}` must be one of {list(options)}, got {value!r}")
        cfg = node_config(recipe, steps=steps, lr=lr, alpha=alpha, granularity=granularity, gate_input=gate_input,
                          gate_family=gate_family, objective=OBJECTIVES[objective], seed=seed, resolution=resolution,
                          batch_size=batch_size)
        guide = (folder_paths.get_full_path_or_raise(CLIP_FOLDER, clip_guide), clip_guide_arch) \
            if clip_guide not in (NONE, "", None) else None
        spec, start = prepare(model, clip, vae, experts, images, prompts, cfg, name, run, node_id(cls), guide,
                              (composition_prompts, base_prompts, concepts))
        job = jobs.submit(spec)
        if run == "background":
            gates = MoleGates(start, experts.names, source=f"MoLE Train Gates job {job.id} (training in the "
                                                             f"background → {spec.file})")
            return io.NodeOutput(gates, curves_image([]), ui={"mole_job": [jobs.view(job)]})
        wait_for(job, steps)
        trained = outcome(job)
        gates = MoleGates(trained, experts.names, source=f"MoLE Train Gates → {spec.file}")
        last = job.history[-1] if job.history else {}
        text = f"trained {spec.file}: {last.get('step', steps)} steps, loss {last.get('loss', 0):.4g}"
        text += " + block search" if spec.cfg.block_search else ""
        return io.NodeOutput(gates, curves_image(job.history),
                             ui={"mole_job": [jobs.view(job)], **ui.PreviewText(text).as_dict()})
