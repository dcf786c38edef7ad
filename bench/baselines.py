"""What MoLE is measured against: random experts, the official-style per-expert loop, PEFT multi-adapter
layers and the single rank-R LoRA floor. All baselines compute the same mixture as MoLE (same factors,
same gate), so at uniform gates every variant returns the same output up to rounding.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from mole_core import Expert, GateConfig, LoraFactor
from mole_core.gates import ScopeGate, entropy, pool_input
from mole_core.naming import execution_key, scope_of


# ----------------------------------------------------------------------------- experts
def random_factor(module: nn.Module, rank: int, gen: torch.Generator, alpha: float | None = None) -> LoraFactor:
    """A non-zero LoRA factor shaped for a Linear or Conv2d (LoCon: ``down`` has the conv's kernel)."""
    if isinstance(module, nn.Conv2d):
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen) / fan_in**0.5
        up = torch.randn(module.out_channels, rank, 1, 1, generator=gen) / rank**0.5
    else:
        down = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
        up = torch.randn(module.out_features, rank, generator=gen) / rank**0.5
    return LoraFactor(down=down, up=up * 0.1, alpha=float(rank) if alpha is None else alpha)


def random_experts(modules: dict[str, nn.Module], n: int, rank: int, seed: int = 0) -> list[Expert]:
    """``n`` experts of rank ``rank`` on every target (canonical name → module), with fake hashes."""
    gen = torch.Generator().manual_seed(seed)
    experts = []
    for i in range(n):
        factors = {t: random_factor(m, rank, gen) for t, m in modules.items()}
        experts.append(Expert(name=f"e{i}", factors=factors, sha256=f"{seed:032x}{i:032x}"))
    return experts


def share_weights_copy(module: nn.Module) -> nn.Module:
    """Deep copy of a module tree whose parameters and buffers are the *same* tensors (no extra memory)."""
    memo: dict[int, object] = {id(p): p for p in module.parameters()}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo)


# ----------------------------------------------------------------------------- official-style loop
def _expert_modules(layer: nn.Module, f: LoraFactor) -> tuple[nn.Module, nn.Module]:
    """``lora_A``/``lora_B`` as separate modules, like the official patched peft layer."""
    if isinstance(layer, nn.Conv2d):
        a: nn.Module = nn.Conv2d(layer.in_channels, f.rank, layer.kernel_size, layer.stride, layer.padding,
                                 layer.dilation, bias=False)
        b: nn.Module = nn.Conv2d(f.rank, layer.out_channels, 1, bias=False)
        a.weight.data = f.down.reshape(a.weight.shape).clone()
        b.weight.data = f.up.reshape(b.weight.shape).clone()
    else:
        a = nn.Linear(layer.in_features, f.rank, bias=False)
        b = nn.Linear(f.rank, layer.out_features, bias=False)
        a.weight.data = f.down.reshape(a.weight.shape).clone()
        b.weight.data = f.up.reshape(b.weight.shape).clone()
    return a, b


class NaiveLoop:
    """The official MoLE recipe at inference: a forward hook per target loops over the experts in Python,
    stacks the N outputs ``s_i B_i(A_i(x))`` into ``(B, N, ...)``, weights them by the gate and sums over N,
    and updates a per-layer gate record and entropy record on every call (official ``gates_record``).

    The gate itself is MoLE's pooled softmax gate (one per block, computed at the block's first target), so
    the difference to MoLE is only the per-expert loop, not the router.
    """

    def __init__(self, modules: dict[str, nn.Module], experts: list[Expert], device: torch.device,
                 dtype: torch.dtype, granularity: str = "block"):
        self.modules, self.n = modules, len(experts)
        order = sorted(modules, key=execution_key)
        self.scope = {t: scope_of(t, granularity) for t in order}
        self.lead: dict[str, str] = {}
        for t in order:
            self.lead.setdefault(self.scope[t], t)
        self.experts: dict[str, list[tuple[nn.Module, nn.Module, float]]] = {}
        for t in order:
            mods = []
            for e in experts:
                a, b = _expert_modules(modules[t], e.factors[t])
                mods.append((a.to(device, dtype).requires_grad_(False), b.to(device, dtype).requires_grad_(False),
                             e.factors[t].scale))
            self.experts[t] = mods
        cfg = GateConfig(granularity=granularity)
        self.gates = {s: ScopeGate(_in_dim(modules[lead]), self.n, cfg).to(device)
                      for s, lead in self.lead.items()}
        self.records = {t: torch.zeros(self.n, device=device) for t in order}
        self.entropy_records = {t: torch.zeros((), device=device) for t in order}
        self._g: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def attach(self) -> NaiveLoop:
        for t, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._hook(t)))
        return self

    def detach(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _hook(self, target: str) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
        scope = self.scope[target]
        is_lead, is_conv = self.lead[scope] == target, isinstance(self.modules[target], nn.Conv2d)
        experts = self.experts[target]

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if is_lead:
                self._g[scope] = self.gates[scope](pool_input(x, is_conv).float())
            g = self._g[scope]
            stacked = torch.stack([b(a(x)) * s for a, b, s in experts], 1)  # (B, N, ...)
            w = g.to(stacked.dtype).reshape(g.shape[0], self.n, *([1] * (stacked.dim() - 2)))
            with torch.no_grad():
                self.records[target] += g.detach().mean(0)
                self.entropy_records[target] += entropy(g.detach()).mean()
            return out + (stacked * w).sum(1)
        return hook


def _in_dim(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


# ----------------------------------------------------------------------------- PEFT / diffusers
def add_peft_adapters(model: nn.Module, experts: list[Expert], weights: list[float], use_diffusers: bool = True,
                      paths: dict[str, str] | None = None) -> nn.Module:
    """Add one PEFT LoRA adapter per expert (their exact factors), all active and weighted, unmerged.

    ``use_diffusers``: ``model.add_adapter`` + ``model.set_adapters`` (diffusers' multi-adapter path);
    otherwise ``peft.inject_adapter_in_model`` and per-layer ``set_adapter`` / ``set_scale``.
    ``paths``: canonical target → module path in ``model`` (default: the canonical name without its component).
    """
    import peft
    from peft.tuners.lora import LoraLayer

    targets = sorted(experts[0].factors)
    paths = paths or {t: t.split(":", 1)[1] for t in targets}
    rank = experts[0].factors[targets[0]].rank
    alpha = experts[0].factors[targets[0]].alpha or rank
    names = [f"e{i}" for i in range(len(experts))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=[paths[t] for t in targets],
                                  init_lora_weights=False)
            if use_diffusers:
                model.add_adapter(cfg, adapter_name=name)
            else:
                peft.inject_adapter_in_model(cfg, model, adapter_name=name)
    _load_factors(model, experts, names, paths)
    if use_diffusers:
        model.set_adapters(names, weights=weights)
    else:
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.set_adapter(names)
                for name, w in zip(names, weights):
                    m.set_scale(name, w)
    return model.requires_grad_(False)


def _load_factors(model: nn.Module, experts: list[Expert], names: list[str], paths: dict[str, str]) -> None:
    with torch.no_grad():
        for e, name in zip(experts, names):
            for target, f in e.factors.items():
                layer = model.get_submodule(paths[target])
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                a.copy_(f.down.reshape(a.shape))
                b.copy_(f.up.reshape(b.shape))
                assert f.alpha == layer.lora_alpha[name], "PEFT alpha must match the expert's"


# ----------------------------------------------------------------------------- single-LoRA floor
def stacked_factors(experts: list[Expert], target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``A_cat``/``B_cat`` of one target: the rank-R LoRA whose cost is MoLE's floor."""
    a = torch.cat([e.factors[target].down for e in experts], 0)
    b = torch.cat([e.factors[target].up * e.factors[target].scale for e in experts], 1)
    return a, b


def lora_floor(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``base(x) + B_cat(A_cat(x))``: plain unmerged rank-R LoRA, no gate, no hook."""
    if isinstance(layer, nn.Conv2d):
        def conv(x: torch.Tensor) -> torch.Tensor:
            h = F.conv2d(x, a, None, layer.stride, layer.padding, layer.dilation)
            return layer(x) + F.conv2d(h, b)
        return conv

    def linear(x: torch.Tensor) -> torch.Tensor:
        return layer(x) + F.linear(F.linear(x, a), b)
    return linear
