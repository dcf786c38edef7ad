"""Carry each prompt's routing decision from its text-encoder call to the UNet calls that use it.

With ``gate_input="router"`` the router runs once per prompt, in the text encoder. The UNet is called later
(every sampling step, with the prompt batched beside the negative prompt, maybe cast to half precision,
repeated to a longer token length, or concatenated with a second encoder's states), so the decision is found
by the conditioning itself: the text encoder's output states are remembered with the prompt's routes, and
each row of the UNet's context finds the remembered states it starts with, every token equal up to rounding. No host
bookkeeping and no batch-order assumption. Only :func:`follow_positive` (``negative_routing="positive"``) needs
to know which rows guide which: ComfyUI says so per call, diffusers always batches the negative prompts first.
"""

from __future__ import annotations

import torch

KEY_TOKENS = 77  # a key is the first 77 token states (one CLIP chunk): unchanged when a host repeats the context
KEY_SIZE = 4096  # at most this many of those values (every k-th feature of every token): 16 KB a prompt
MIN_COSINE = 0.9999  # per token: bf16 rounding stays above 1 − 4e-6; a different word falls below 1 − 1e-3


def _keys(states: torch.Tensor, tokens: int, width: int) -> torch.Tensor:
    """``states[:, :tokens, :width:k]`` with each token's row at unit norm (k so that at most :data:`KEY_SIZE`
    values remain) → ``(B, tokens, ≤ width)`` (float32, no graph)."""
    stride = max(1, -(-tokens * width // KEY_SIZE))
    x = states.detach()[:, :tokens, :width:stride].float()
    return torch.nn.functional.normalize(x, dim=-1)


def _similarity(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(B, K)``: the smallest per-token cosine between each query row and each key. Whole-sequence cosines
    of two prompts that differ in one word can exceed 0.9999 (the other tokens dominate); the differing
    word's own token cannot."""
    return torch.einsum("bld,kld->bkl", q, keys).amin(-1)


class RouteTable:
    """The last ``capacity`` remembered prompt states and their router logits (logits keep their graph while
    training, so the UNet's use of a route trains the router). The default holds a batch of 512 prompts and
    their negatives (16 MB of keys)."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._entries: list[tuple[tuple[int, int], torch.Tensor, torch.Tensor]] = []  # (shape, key, route)
        self.misses = 0  # UNet rows whose conditioning matched no remembered prompt
        self._stacked: dict = {}  # (shape, device) → (entry indices newest first, stacked keys): built once per change

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._stacked.clear()

    def remember(self, states: torch.Tensor, routes: torch.Tensor) -> None:
        """Store each row of a text encoder's token states ``(B, L, D)`` with its router logits ``(B, N)``."""
        if states.dim() != 3 or routes.dim() != 2 or routes.shape[0] != states.shape[0]:
            return
        shape = (min(states.shape[1], KEY_TOKENS), states.shape[2])
        for key, route in zip(_keys(states, *shape), routes):
            self._entries.append((shape, key, route))
        del self._entries[:-self.capacity]
        self._stacked.clear()

    def lookup(self, context: torch.Tensor, n_experts: int) -> torch.Tensor:
        """Router logits ``(B, N)`` for each row of a UNet context ``(B, L, D)``: per 77-token chunk of the row,
        the newest remembered prompt chunk the row's chunk starts with (every token's cosine ≥
        :data:`MIN_COSINE` over the remembered features), the largest logit over the row's matched chunks (a
        long prompt is several chunks; a host may repeat a short one); 0 (each scope's prior gate) where no
        chunk matches."""
        batch = context.shape[0]
        out = torch.full((batch, n_experts), -torch.inf, device=context.device)
        hit_any = torch.zeros(batch, dtype=torch.bool, device=context.device)
        if context.dim() == 3:
            for start in range(0, context.shape[1], KEY_TOKENS):
                routes, hit = self._match(context[:, start:], n_experts)
                out = torch.where(hit[:, None], torch.maximum(out, routes), out)
                hit_any |= hit
        self.misses += int((~hit_any).sum())
        return torch.where(hit_any[:, None], out, torch.zeros_like(out))

    def _match(self, context: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Routes ``(B, N)`` and hits ``(B,)`` of the chunk starting ``context``."""
        batch = context.shape[0]
        best = torch.full((batch,), -2.0, device=context.device)
        out = torch.zeros(batch, n_experts, device=context.device)
        shapes = {s for s, _, _ in self._entries if s[0] <= context.shape[1] and s[1] <= context.shape[2]}
        for shape in shapes:
            if (shape, context.device) not in self._stacked:  # sampling: once, not every step
                idx = [i for i in range(len(self._entries) - 1, -1, -1) if self._entries[i][0] == shape]  # newest 1st
                keys = torch.stack([self._entries[i][1] for i in idx]).to(context.device)
                self._stacked[(shape, context.device)] = idx, keys
            idx, keys = self._stacked[(shape, context.device)]
            sims = _similarity(_keys(context, *shape), keys)
            top = sims.max(1).values
            # the newest of the best: a prompt encoded again equals its older copies up to GEMM rounding, and
            # an older copy's logits may belong to a graph that was already used (training)
            pick = (sims >= top[:, None] - 1e-6).int().argmax(1)
            better = (top >= MIN_COSINE) & (top > best + 1e-6)
            if better.any():
                routes = torch.stack([self._entries[idx[j]][2] for j in pick.tolist()]).to(context.device)
                out = torch.where(better[:, None], routes.float(), out)
                best = torch.where(better, top, best)
        return out, best >= MIN_COSINE


NEGATIVES_FIRST = (1, 0)  # diffusers' CFG batch: the negative prompts' rows, then the prompts' (ComfyUI: 1 = uncond)


def follow_positive(routes: torch.Tensor, latents: torch.Tensor, kinds: list[int] | tuple[int, ...] | None
                    ) -> torch.Tensor:
    """Routes ``(B, N)`` where each unconditional row takes the route of the conditional row it guides.

    The batch is ``len(kinds)`` equal chunks, ``kinds[i]`` 0 for a conditional (prompt) chunk and 1 for an
    unconditional (negative prompt) one — ComfyUI's ``cond_or_uncond``; ``None``: diffusers' layout
    (:data:`NEGATIVES_FIRST`). A row of an unconditional chunk takes the route of the same row of the first
    conditional chunk when both rows denoise the same latent (classifier-free guidance feeds both branches one
    latent); any other batch (no guidance, a split that does not divide the batch) keeps its routes."""
    kinds = tuple(NEGATIVES_FIRST if kinds is None else kinds)
    batch = routes.shape[0]
    if 0 not in kinds or 1 not in kinds or batch % len(kinds) or latents.shape[0] != batch:
        return routes
    size = batch // len(kinds)
    r, x = routes.split(size), latents.split(size)
    cond = kinds.index(0)
    out = [torch.where((x[i] == x[cond]).flatten(1).all(1)[:, None], r[cond], r[i]) if k == 1 else r[i]
           for i, k in enumerate(kinds)]
    return torch.cat(out)
