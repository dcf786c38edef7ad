"""Named training recipes: sets of :class:`~train.config.TrainConfig` fields the CLI's ``--recipe`` and
:func:`recipe_config` start from (any field given explicitly wins).

``paper`` is the plain defaults (the paper's gates: softmax, denoising objective, one gate per block).
``compose`` is the recipe the composition benchmark (``bench/composition.py``) measures best — its default set's
last row: sigmoid gates that switch each LoRA on by its trigger word (the word its file is named after), trained on
sampled compositions (objective ``compose``: global, local and prior guidance, the negative prompt routed like the
prompt), then the block search: per set of LoRAs a prompt names, the UNet stages each LoRA runs in fully and its
text-encoder strength, elsewhere a floor (mean 0.7) shared among the compositions and placed where it spoils least,
searched on the compositions only, each image scored by the guide (and its dark view) plus a small texture term. It
needs what only the user has: composition prompts naming two or more LoRAs' trigger words, base prompts, reference
images per concept and a CLIP guide.
"""

from __future__ import annotations

from mole_core import MoleError

from .config import TrainConfig, config_fields

_COMPOSE = dict(
    objective="compose", gate_family="sigmoid", gate_input="trigger", granularity="block", alpha=0.0,
    train_text_gates=True, text_pool="max", center_features=True, route_weight=1.0, train_magnitudes=False,
    negative_routing="positive", m_max=3.0, base_share=0.25, prior_weight=0.5, local_weight=1.0,
    block_search=True, search_text_strengths="1.5,2,2.5", search_dark_view=0.25, search_by_set="refine",
    search_windows=True, search_text_by_set=True, search_min_strength=0.7, search_place_floors=True,
    search_share_floors=True, search_compositions_only=True, search_texture_weight=0.1,
)
RECIPES: dict[str, dict] = {"paper": {}, "compose": _COMPOSE}


def recipe_fields(name: str) -> dict:
    """The fields recipe ``name`` sets (one-line error for an unknown name)."""
    if name not in RECIPES:
        raise MoleError(f"`recipe` must be one of {sorted(RECIPES)}, got {name!r}")
    return dict(RECIPES[name])


def recipe_config(name: str, **fields: object) -> TrainConfig:
    """A :class:`TrainConfig` from recipe ``name`` with ``fields`` on top (e.g. ``steps``, ``lr``); an unknown
    field name is a one-line error."""
    unknown = sorted(set(fields) - {f for f, *_ in config_fields()})
    if unknown:
        raise MoleError(f"unknown training option {unknown[0]!r} (see `mole-train train --help`)")
    return TrainConfig(**{**recipe_fields(name), **fields})
