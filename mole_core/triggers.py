"""Trigger keys of ``gate_input="trigger"``: each expert's key is the token embedding of the word its LoRA is
named after, centred on the mean embedding of the distinct tokens the training prompts use."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from .errors import MoleError
from .expert import Expert
from .mixture import Mixture


def trigger_words(experts: list[Expert], concepts: list[str]) -> list[str | None]:
    """Each expert's trigger word: the concept its LoRA file is named after (``purple.safetensors`` ↔ purple,
    case-insensitive), None for an expert named after none."""
    lower = {c.lower(): c for c in concepts if c}
    return [lower.get(re.sub(r"\.safetensors$", "", e.name, flags=re.IGNORECASE).lower()) for e in experts]


def _capture(mix: Mixture, encode: Callable[[list[str]], object], texts: list[str], chunk: int = 16) -> torch.Tensor:
    """Token embeddings ``(B, L, d)`` the router sees while ``encode`` runs on ``texts`` (chunks of ``chunk``)."""
    seen: list[torch.Tensor] = []
    handle = mix.router_module.register_forward_hook(lambda m, a, out: seen.append(out.detach().float().cpu()))
    try:
        with torch.no_grad():
            for i in range(0, len(texts), chunk):
                encode(texts[i:i + chunk])
    finally:
        handle.remove()
    if not seen:
        raise MoleError("gate_input 'trigger': the text encoder's token embedding did not run while encoding")
    return torch.cat(seen)


def calibrate_triggers(mix: Mixture, encode: Callable[[list[str]], object], prompts: list[str],
                       triggers: list[str | None]) -> None:
    """Centre the trigger router on the distinct tokens of ``prompts`` and set expert i's key to the mean token
    embedding of ``triggers[i]`` (None or "": no key, the expert's gate is then its bias alone). ``encode`` runs
    the mixture's text encoder on a list of prompts (a backend's ``encode_prompts``)."""
    if mix.config.gate_input != "trigger" or mix.router_module is None:
        raise MoleError("calibrate_triggers needs a mixture with gate_input 'trigger' and its text encoder attached")
    if len(triggers) != mix.n:
        raise MoleError(f"need one trigger word (or None) per expert ({mix.n}), got {len(triggers)}")
    words = [t for t in triggers if t]
    if not words:
        raise MoleError("gate_input 'trigger': no expert has a trigger word (name each LoRA file after its word)")
    rows = _capture(mix, encode, sorted(set(prompts) | set(words)))
    flat = rows.reshape(-1, rows.shape[-1])
    center = torch.unique(flat, dim=0).mean(0)  # distinct tokens: padding repeats in every prompt
    emb = _capture(mix, encode, [*words, ""], chunk=len(words) + 1)
    eos = emb[-1, 1]  # the empty prompt: start token, end token, padding
    keys = torch.zeros(mix.n, flat.shape[-1])
    it = iter(range(len(words)))
    for i, t in enumerate(triggers):
        if not t:
            continue
        row = emb[next(it)]
        end = next((j for j in range(1, row.shape[0]) if torch.equal(row[j], eos)), row.shape[0])
        if end <= 1:
            raise MoleError(f"gate_input 'trigger': the trigger word {t!r} has no tokens")
        keys[i] = row[1:end].mean(0)
    router = mix.gates["router"]
    router.center.copy_(center.to(router.center.device))
    router.set_keys(keys.to(router.weight.device))
