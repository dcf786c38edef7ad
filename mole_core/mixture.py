"""Attach a gated mixture of LoRA experts to any torch model through forward hooks.

Every target layer computes ``y = W x + λ Σ_i g_i s_i E_i(x)`` (README, "What the engine computes"). The gate of a
scope is computed at the scope's *lead* target (the first to run, by canonical execution
order) from its pooled input, its pooled expert outputs or (UNet scopes, ``gate_input="prompt"``)
the max-pooled prompt conditioning that the UNet's root pre-hook captured, and reused by the
scope's other targets in the same forward pass. Module tree and state dict are never changed; detach
removes every hook so outputs are bit-identical to the bare model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .bank import ExpertBank
from .checks import check_number, check_numbers
from .errors import MoleError, MoleWarning
from .expert import Expert, check_experts
from .gates import (
    MODES,
    GateConfig,
    PromptRouter,
    ScopeGate,
    TriggerRouter,
    balance_loss,
    pool_input,
    pool_prompt,
    static_gates,
)
from .model_index import ModelIndex
from .naming import execution_key, scope_of
from .routes import RouteTable, follow_positive
from .stats import GateStats


@dataclass
class MatchReport:
    """How many of an expert's targets exist in the model."""

    expert: str
    matched: int
    total: int
    missing: list[str]

    def line(self) -> str:
        return f"{self.expert}: {self.matched}/{self.total} targets matched"


@dataclass
class _Scope:
    name: str
    lead: str
    targets: list[str]
    component: str
    feature_dim: int
    gate: torch.Tensor | None = None
    recorded: bool = False  # statistics taken for this forward (not again on a checkpoint recompute)
    coefs: dict | None = None  # this forward's rank-row coefficients per bank layout (shared by the targets)


class Mixture:
    """A MoLE attached to a model. Create with :func:`attach`.

    Attributes:
        experts: the experts, in gate order.
        banks: canonical target → :class:`ExpertBank`.
        scopes: scope name → lead target, targets, feature size.
        gates: ``nn.Module`` holding every trainable gate parameter.
        stats: :class:`GateStats` of the gates seen since the last reset.
    """

    def __init__(self, index: ModelIndex, experts: list[Expert], gate_config: GateConfig | None = None, *,
                 mode: str = "gated", weights: list[float] | None = None, mask: list[bool] | None = None,
                 strength: float = 1.0, components: list[str] | None = None, hooks: bool = True,
                 routes: RouteTable | None = None):
        check_experts(experts)
        self.index = index
        self.experts = experts
        self.n = len(experts)
        self.config = gate_config or GateConfig()
        comps = self._comps = set(components or index.components())
        self.reports = self._match(comps)
        self.banks: dict[str, ExpertBank] = {}
        for target in sorted({t for e in experts for t in e.factors if t in index.modules
                              and t.split(":", 1)[0] in comps}, key=execution_key):
            members = [(i, e.factors[target]) for i, e in enumerate(experts) if target in e.factors]
            self.banks[target] = ExpertBank(target, members, index.modules[target])
        self.scopes = self._build_scopes()
        self.scope_names = list(self.scopes)
        self.gates = nn.ModuleDict({f"s{i}": ScopeGate(s.feature_dim, self.n, self.config)
                                    for i, s in enumerate(self.scopes.values())})
        # gate_input "router": one router on the first text-encoder layer; its logits per prompt are every
        # scope's features, carried to the UNet by the prompt's conditioning (RouteTable)
        # (a UNet-only mixture shares the routes of its text encoders' mixture: ComfyUI's MODEL and CLIP)
        # gate_input "trigger": the same, the router reading the token embeddings (see TriggerRouter)
        self.routed = self.config.routed
        self.router_module: nn.Module | None = None
        self.router_lead = self._router_lead(shared=routes is not None) if self.routed else None
        if self.router_lead is not None:
            kind = TriggerRouter if self.config.gate_input == "trigger" else PromptRouter
            self.gates["router"] = kind(int(self.router_module.weight.shape[1]), self.n, self.config)
        self.routes = routes if routes is not None else RouteTable()
        self._route: torch.Tensor | None = None  # router logits of the latest text-encoder call
        self._unet_route: torch.Tensor | None = None  # router logits of the current UNet call's rows
        self._warned_miss = False
        device = next(iter(index.modules[next(iter(self.banks))].parameters()), torch.empty(0)).device
        self.gates.to(device)
        self.stats = GateStats(self.n)
        self.live_gates: dict[str, torch.Tensor] = {}
        self._prompt: torch.Tensor | None = None  # context of the current UNet call (gate_input "prompt")
        self._center_sums: dict[str, list] | None = None  # set while calibrate_centers() runs
        self._handles: list[RemovableHandle] = []
        self._mode = "gated"
        self._weights: torch.Tensor | None = None
        self._mask = torch.ones(self.n)
        self._strength = 1.0
        self._rows: torch.Tensor | None = None
        self._single: int | None = None  # the one expert of one-hot row gates (LoRA Switch's fast path)
        self._single_scale: float | None = None
        self._sample_factors: torch.Tensor | None = None  # sample_scales(): (V, S, N) factors, (b,) variants
        self._sample_variant: torch.Tensor | None = None
        self.set_mode(mode, weights)
        self.set_mask(mask)
        self.strength = strength
        if hooks:
            self._attach_hooks()

    # ----- construction -----
    def _match(self, comps: set[str]) -> list[MatchReport]:
        reports = []
        for e in self.experts:
            own = [t for t in e.factors if t.split(":", 1)[0] in comps]
            missing = [t for t in own if t not in self.index.modules]
            reports.append(MatchReport(e.name, len(own) - len(missing), len(own), missing))
        if not any(r.total for r in reports):
            raise MoleError(f"no expert has LoRA targets in {sorted(comps)}")
        for r in reports:
            if r.matched == 0 and r.total > 0:
                example = f" (e.g. {r.missing[0]})" if r.missing else ""
                raise MoleError(f"expert {r.expert!r}: 0 of {r.total} LoRA targets match this model — "
                                f"a LoRA for another architecture?{example}")
            if r.missing:
                warnings.warn(f"expert {r.expert!r}: {len(r.missing)} of {r.total} targets not in the model "
                              f"(e.g. {r.missing[0]})", MoleWarning, stacklevel=3)
        return reports

    def _build_scopes(self) -> dict[str, _Scope]:
        groups: dict[str, list[str]] = {}
        for t in self.banks:
            groups.setdefault(scope_of(t, self.config.granularity), []).append(t)
        unet_reads_prompt = self._reads_prompt("unet") and any(s.startswith("unet:") for s in groups)
        context_dim = self._context_dim() if unet_reads_prompt else 0
        scopes = {}
        for name in sorted(groups, key=lambda s: execution_key(groups[s][0])):
            targets = sorted(groups[name], key=execution_key)
            lead = self.banks[targets[0]]
            component = name.split(":", 1)[0]
            if self.config.routed:
                dim = 0  # the shared router's logits are the features
            elif self._reads_prompt(component):
                dim = context_dim
            elif self.config.gate_input == "experts":
                dim = self.n * lead.out_dim
            else:  # "input", and "prompt" on text-encoder scopes (a text encoder has no prompt context)
                dim = lead.in_dim
            scopes[name] = _Scope(name, targets[0], targets, component, dim)
        return scopes

    def _reads_prompt(self, component: str) -> bool:
        return self.config.gate_input == "prompt" and component == "unet"

    def _captures_context(self, component: str) -> bool:
        return (self.config.gate_input == "prompt" or self.config.routed) and component == "unet"

    def _router_lead(self, shared: bool) -> str | None:
        """The module the router reads (also sets :attr:`router_module`): the first text encoder's first
        attention input (its q projection) for ``router``, its token embedding for ``trigger``. None for a
        UNet-only mixture given ``routes``."""
        for comp in ("te", "te2"):
            if comp not in self._comps:
                continue
            if self.config.gate_input == "trigger":
                root = self.index.roots.get(comp)
                found = next((m for n, m in root.named_modules() if n.endswith("token_embedding")), None) \
                    if root is not None else None
                if found is not None:
                    self.router_module = found
                    return f"{comp}:token_embedding"
                continue
            lead = next((t for t in sorted(self.index.modules, key=execution_key)
                         if t.startswith(f"{comp}:") and t.endswith("layers.0.self_attn.q_proj")), None)
            if lead is not None:
                self.router_module = self.index.modules[lead]
                return lead
        if shared:
            return None
        raise MoleError(f"gate_input {self.config.gate_input!r} needs a CLIP text encoder among the attached "
                        "components (the router reads its first layer); attach the text encoders too, or use "
                        "gate_input 'input'")

    def _context_dim(self) -> int:
        """Width of the UNet's cross-attention context (the key projection of any cross-attention)."""
        for name, module in self.index.modules.items():
            if name.startswith("unet:") and name.endswith("attn2.to_k"):
                return int(module.weight.shape[1])
        raise MoleError("gate_input 'prompt' needs a UNet with cross-attention (no attn2.to_k layer found); "
                        "use gate_input 'input'")

    def _attach_hooks(self) -> None:
        if self._handles:
            return
        for comp, root in self.index.roots.items():
            if comp in self._comps:
                reads_prompt = self._captures_context(comp)
                self._handles.append(root.register_forward_pre_hook(self._root_hook(comp, reads_prompt),
                                                                    with_kwargs=reads_prompt))
        if self.router_lead is not None:  # before the target hooks: the lead may be a target too
            self._handles.append(self.router_module.register_forward_hook(self._router_hook))
            root = self.index.roots.get(self.router_lead.split(":", 1)[0])
            if root is not None:
                self._handles.append(root.register_forward_hook(self._remember_hook))
        for scope_i, scope in enumerate(self.scopes.values()):
            gate = self.gates[f"s{scope_i}"]
            for t in scope.targets:
                hook = self._target_hook(self.banks[t], scope, gate, t == scope.lead, scope_i)
                self._handles.append(self.index.modules[t].register_forward_hook(hook))

    def _root_hook(self, comp: str, reads_prompt: bool):
        # A new forward pass: forget the previous pass's gates. No Python counter is read in the traced
        # hooks, so torch.compile does not guard on (and recompile for) a value that changes every call.
        scopes = [s for s in self.scopes.values() if s.component == comp]

        def hook(module: nn.Module, args: tuple) -> None:
            for s in scopes:
                s.gate, s.recorded, s.coefs = None, False, None

        def prompt_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hook(module, args)
            # diffusers: unet(sample, t, encoder_hidden_states); ComfyUI: diffusion_model(x, t, context=…)
            # (kept raw, pooled at each lead: pooling here would split the graph under torch.compile)
            context = kwargs.get("encoder_hidden_states", kwargs.get("context"))
            if context is None and len(args) > 2:
                context = args[2]
            self._prompt = context if isinstance(context, torch.Tensor) else None
            routed = self.routed and self._prompt is not None and self._mode == "gated"
            misses = self.routes.misses
            self._unet_route = self.routes.lookup(self._prompt, self.n) if routed else None
            if self._unet_route is not None and self.config.negative_routing == "positive":
                latents = args[0] if args else kwargs.get("sample", kwargs.get("x"))
                kinds = (kwargs.get("transformer_options") or {}).get("cond_or_uncond")  # ComfyUI
                if isinstance(latents, torch.Tensor):
                    self._unet_route = follow_positive(self._unet_route, latents, kinds)
            if self.routes.misses > misses and not self._warned_miss:
                self._warned_miss = True
                warnings.warn("gate_input 'router': the UNet got conditioning of no prompt the text encoder "
                              "routed (a CLIP without MoLE, or changed after encoding): those rows run at the "
                              "prior gates", MoleWarning, stacklevel=2)
        return prompt_hook if reads_prompt else hook

    def _router_hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self._mode != "gated" or self._rows is not None:
            return
        trigger = self.config.gate_input == "trigger"
        x = out if trigger else args[0]  # token embeddings (their input is the token ids), or layer-0 states
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])
        if self._center_sums is not None and not trigger:  # a trigger router is centred by calibrate_triggers()
            self._collect("router", tokens)
        router = self.gates["router"]
        self._route = router(tokens.to(router.weight.device, torch.float32))

    def _remember_hook(self, module: nn.Module, args: tuple, out: object) -> None:
        """Remember the text encoder's output states with the prompts' routes: the last layer (diffusers'
        and ComfyUI's SD1.x default), ComfyUI's requested intermediate layer (clip skip, SDXL) and the
        penultimate of diffusers' ``hidden_states`` (SDXL); hosts that change them further call
        :meth:`remember_conditioning`."""
        if self._route is None:
            return
        states = [out] if isinstance(out, torch.Tensor) else []
        if isinstance(out, (tuple, list)) or (isinstance(out, dict) and not isinstance(out, torch.Tensor)):
            items = list(out.values()) if isinstance(out, dict) else list(out)
            states = [x for x in items[:2] if isinstance(x, torch.Tensor)]
            hidden = out.get("hidden_states") if isinstance(out, dict) else None
            if isinstance(hidden, (tuple, list)) and len(hidden) > 1:
                states.append(hidden[-2])
        for x in states:
            self.routes.remember(x, self._route)

    def remember_conditioning(self, conditioning: torch.Tensor) -> None:
        """Tell a router mixture that ``conditioning`` ``(B, L, D)`` is what the UNet will be given for the
        prompts of the latest text-encoder call (hosts whose conditioning is not the encoder's own output:
        SDXL's two encoders concatenated, a penultimate layer)."""
        if self._route is not None:
            self.routes.remember(conditioning, self._route)

    def _prompt_features(self, batch: int) -> torch.Tensor:
        if self._prompt is None:
            raise MoleError("gate_input 'prompt': the UNet was called without prompt conditioning "
                            "(encoder_hidden_states / context)")
        f = self._prompt if self.config.token_routing else pool_prompt(self._prompt)
        if f.dim() == 2 and self.config.token_routing:
            f = f[:, None]
        if f.shape[0] != batch:
            if f.shape[0] != 1:
                raise MoleError(f"gate_input 'prompt': the prompt conditioning has batch {f.shape[0]}, "
                                f"the latents {batch}")
            f = f.expand(batch, *f.shape[1:])
        return f

    def _route_rows(self, scope: _Scope, batch: int) -> torch.Tensor:
        if scope.component not in ("unet", self.router_lead.split(":", 1)[0] if self.router_lead else "te"):
            # a second text encoder (SDXL's te2) may run before the router's (ComfyUI encodes G before L): its
            # scopes run at their prior gates, the same in every host
            return torch.zeros(batch, self.n, device=self.gates["router"].weight.device)
        route = self._unet_route if scope.component == "unet" else self._route
        if route is None:
            where = "UNet was called without prompt conditioning" if scope.component == "unet" else \
                "text encoder's first layer did not run before"
            raise MoleError(f"gate_input 'router': the {where} scope {scope.name}")
        if route.shape[0] != batch:
            if route.shape[0] != 1:
                raise MoleError(f"gate_input 'router': {route.shape[0]} routed prompts for a batch of {batch}")
            route = route.expand(batch, -1)
        return route

    def _target_hook(self, bank: ExpertBank, scope: _Scope, gate: ScopeGate, is_lead: bool, scope_i: int):
        is_conv = bank.is_conv
        experts_input = self.config.gate_input == "experts"
        prompt_input = self._reads_prompt(scope.component)
        pool = self.config.text_pool if scope.component != "unet" else "mean"
        if self.config.token_routing and scope.component != "unet" and not is_conv:
            pool = "tokens"  # the gate scores every token and takes the max

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if self._single is not None:  # one expert for every sample (LoRA Switch): only its rank rows
                if is_lead and not scope.recorded:
                    self.stats.record(scope.name, self._rows_dev(out.device))
                    scope.recorded = True
                return bank.add_one(out, x, self._single, self._single_scale)
            if self._rows is None and self._mode != "gated":  # fixed weights: folded into B once per refresh
                key = (bank.target, out.device, out.dtype)
                up = self._fixed_up.get(key)
                if up is None:
                    coef = (self._static[0] * self._scale_n)[bank.seg]
                    up = self._fixed_up[key] = bank.scaled_up(coef, out.device, out.dtype)
                return bank.add_fixed(out, x, up)
            h = bank.shrink(x)
            # the scope's coefficients of this forward (sampling only: under autograd every target builds its own,
            # so a gradient-checkpoint recompute saves the same tensors as the forward it replays)
            if not is_lead and scope.coefs is not None and not torch.is_grad_enabled():
                coef = scope.coefs.get((bank.layout, h.dtype, h.dim()))
                if coef is not None:
                    return bank.expand_add_rows(out, h, coef)
            if self._rows is not None:  # a host's per-sample gates (LoRA Switch / Composite)
                g = self._rows_dev(h.device)
                if is_lead and not scope.recorded:
                    self.stats.record(scope.name, g)
                    scope.recorded = True
            elif self._mode == "gated":
                if is_lead:
                    if self.routed:
                        feats = self._route_rows(scope, x.shape[0])
                    elif prompt_input:
                        feats = self._prompt_features(x.shape[0])
                    elif experts_input:
                        feats = bank.pooled_expert_outputs(h, self.n).flatten(1)
                    else:
                        feats = pool_input(x, is_conv, pool)
                    if self._center_sums is not None:  # calibrate_centers(): collect the raw features
                        self._collect(scope.name, feats)
                    if feats.dtype != torch.float32 or feats.device != gate.weight.device:
                        feats = feats.to(gate.weight.device, torch.float32)
                    g = gate(feats, self._mask_dev(feats.device))  # the mask is data: no guard, no recompile
                    if self._sample_factors is not None and scope.component == "unet":
                        g = g * self._sample_factor(scope_i, g.shape[0], g.device)
                    scope.gate = g
                    self.live_gates[scope.name] = g
                    if not scope.recorded:  # a gradient-checkpoint recompute re-runs this hook
                        self.stats.record(scope.name, g)
                        scope.recorded = True
                else:
                    g = scope.gate
                    if g is None:
                        raise MoleError(f"{bank.target} ran before {scope.lead}, the layer that computes the gate "
                                        f"of scope {scope.name}, in this forward pass")
            coef = bank.row_coefficients(g, self._scale_n_dev(h.device), h)
            if not torch.is_grad_enabled():
                if is_lead or scope.coefs is None:
                    scope.coefs = {}
                scope.coefs[(bank.layout, h.dtype, h.dim())] = coef
            return bank.expand_add_rows(out, h, coef)
        return hook

    def _collect(self, scope: str, feats: torch.Tensor) -> None:
        f = feats.detach().float()
        f = f.reshape(-1, f.shape[-1])  # token features: every token counts
        acc = self._center_sums.setdefault(scope, [torch.zeros(f.shape[-1], device=f.device), 0])
        acc[0] = acc[0] + f.sum(0)
        acc[1] += f.shape[0]

    @torch.no_grad()
    def calibrate_centers(self, run: Callable[[], object]) -> int:
        """Set each gate's feature centre to the mean raw feature its scope sees while ``run()`` runs
        (e.g. the model on the training prompts), so the router weights read only what differs between
        inputs and the bias carries what they share. Returns the number of scopes calibrated."""
        self._center_sums = {}
        try:
            run()
            sums = self._center_sums
        finally:
            self._center_sums = None
        named = {name: self.gates[f"s{i}"] for i, name in enumerate(self.scopes)}
        if self.router_lead is not None:
            named["router"] = self.gates["router"]
        for name, gate in named.items():
            if name in sums and gate.center.numel():
                total, count = sums[name]
                gate.center.copy_((total / count).to(gate.center.device))
        return len(sums)

    # ----- runtime state -----
    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str, weights: list[float] | None = None) -> None:
        """``gated`` (learned gates), ``uniform`` (NLA, 1/N) or ``static`` (fixed ``weights``)."""
        if mode not in MODES:
            raise MoleError(f"`mode` must be one of {MODES}, got {mode!r}")
        if weights is not None:
            if len(weights) != self.n:
                raise MoleError(f"`weights` must have one value per expert ({self.n}), got {len(weights)}")
            self._weights = torch.tensor(check_numbers(weights, "weights"))
        if mode == "static" and self._weights is None:
            raise MoleError("static mode needs `weights` (one per expert)")
        self._mode = mode
        self._refresh()

    def set_row_gates(self, gates: torch.Tensor | None) -> None:
        """Fixed gates per sample, ``(B, N)`` or ``(1, N)``, for the next forward passes, in place of the
        mode's gates; ``None`` returns to them. Hosts set them before each model call for LoRA Switch and
        LoRA Composite (:mod:`mole_core.methods`); they are recorded in :attr:`stats` like learned gates."""
        if gates is not None and (gates.dim() != 2 or gates.shape[1] != self.n):
            raise MoleError(f"row gates must have shape (batch, {self.n}), got {tuple(gates.shape)}")
        self._rows = None if gates is None else gates.detach().float().cpu()
        self._single = self._single_scale = None
        if self._rows is not None and self._rows.shape[0] == 1 and int((self._rows != 0).sum()) == 1:
            e = int(self._rows[0].nonzero()[0, 0])  # host tensor: no device sync
            self._single, self._single_scale = e, float(self._rows[0, e] * self._scale_n[e])
        for key in [k for k in self._dev_cache if k[0] == "rows"]:  # in place (see _refresh)
            if self._rows is None:
                del self._dev_cache[key]
            else:
                self._dev_cache[key] = self._rows.to(key[1])

    def _rows_dev(self, device: torch.device) -> torch.Tensor:
        return self._on_device("rows", self._rows, device)

    def set_mask(self, mask: list[bool] | list[int] | None) -> None:
        """Which experts are on (masking mode renormalises the remaining gates)."""
        if mask is None:
            mask = [e.enabled for e in self.experts]
        if len(mask) != self.n:
            raise MoleError(f"`mask` must have one value per expert ({self.n}), got {len(mask)}")
        if not any(mask):
            raise MoleError("`mask` switches every expert off; keep at least one")
        self._mask = torch.tensor([1.0 if m else 0.0 for m in mask])
        self._refresh()

    @property
    def mask(self) -> list[bool]:
        return [bool(m) for m in self._mask.tolist()]

    @property
    def strength(self) -> float:
        """Mixture strength λ (multiplies the whole mixture)."""
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._strength = check_number(value, "strength")
        self._refresh()

    def set_expert_strengths(self, strengths: list[float]) -> None:
        if len(strengths) != self.n:
            raise MoleError(f"`strengths` must have one value per expert ({self.n}), got {len(strengths)}")
        for e, s in zip(self.experts, check_numbers(strengths, "strengths")):
            e.strength = s
        self._refresh()

    def _refresh(self) -> None:
        strengths = torch.tensor([e.strength for e in self.experts])
        self._scale_n = self._strength * strengths
        if getattr(self, "_single", None) is not None:
            self._single_scale = float(self._rows[0, self._single] * self._scale_n[self._single])
        self._static = static_gates(self._mode, self.n, self._mask, self._weights) if self._mode != "gated" else None
        # device copies of scale and mask, refreshed *in place* with the same keys: under torch.compile a new
        # strength or mask is new data in the same guarded dict, not a recompile
        self._dev_cache: dict = getattr(self, "_dev_cache", {})
        for kind, device in list(self._dev_cache):
            if kind in ("scale", "mask"):
                self._dev_cache[(kind, device)] = (self._scale_n if kind == "scale" else self._mask).to(device)
        self._fixed_up: dict = {}  # fixed modes: B with the coefficients folded in, per target/device/dtype

    def _scale_n_dev(self, device: torch.device) -> torch.Tensor:
        return self._on_device("scale", self._scale_n, device)

    def _mask_dev(self, device: torch.device) -> torch.Tensor:
        return self._on_device("mask", self._mask, device)

    def _on_device(self, kind: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``value`` on ``device``, copied once per change (no host→device copy on every call)."""
        key = (kind, device)
        if key not in self._dev_cache:
            self._dev_cache[key] = value.to(device)
        return self._dev_cache[key]

    # ----- training helpers -----
    def gate_parameters(self) -> list[nn.Parameter]:
        """The only trainable parameters of MoLE (gate weights, biases, temperatures)."""
        return [p for p in self.gates.parameters() if p.requires_grad]

    def balance_loss(self) -> torch.Tensor:
        """Eq. 14–15 over the gates of the last forward pass (α applied by the caller)."""
        return balance_loss(list(self.live_gates.values()), self._mask.bool())

    @contextmanager
    def sample_scales(self, factors: torch.Tensor, variant: torch.Tensor) -> Iterator[None]:
        """Within the block, scale each sample's UNet gates by factors of its own (gated mode): ``factors``
        ``(V, S, N)`` — variant ``v``'s factor per scope (in :attr:`scope_names` order) and expert —, ``variant``
        ``(b,)`` the variant of each of ``b`` prompts; a UNet forward of ``k·b`` rows (``[negative; positive]``
        under classifier-free guidance) gives row ``r`` the variant ``variant[r % b]``. Text-encoder scopes must
        have factor 1 (a host may encode prompt by prompt; set their state on the gates). Lets a search score many
        gate settings in one batch."""
        if self._mode != "gated" or self._rows is not None:
            raise MoleError("sample_scales needs a mixture in gated mode")
        if factors.dim() != 3 or tuple(factors.shape[1:]) != (len(self.scope_names), self.n):
            raise MoleError(f"sample_scales: factors must be (V, {len(self.scope_names)}, {self.n}), "
                            f"got {tuple(factors.shape)}")
        text = [i for i, name in enumerate(self.scope_names) if self.scopes[name].component != "unet"]
        if text and not bool((factors[:, text] == 1).all()):
            raise MoleError("sample_scales: text-encoder scopes must have factor 1 (set their magnitudes instead)")
        if variant.dim() != 1 or not variant.numel() or not 0 <= variant.min() <= variant.max() < len(factors):
            raise MoleError(f"sample_scales: variant must be a non-empty (b,) tensor of indices below {len(factors)}")
        previous = self._sample_factors, self._sample_variant
        self._sample_factors, self._sample_variant = factors.float(), variant.long()
        try:
            yield
        finally:
            self._sample_factors, self._sample_variant = previous

    def _sample_factor(self, scope_i: int, batch: int, device: torch.device) -> torch.Tensor:
        """The ``(batch, N)`` factors of :meth:`sample_scales` for scope ``scope_i``."""
        b = self._sample_variant.numel()
        if batch % b:
            raise MoleError(f"sample_scales: a UNet forward of {batch} rows for {b} prompts")
        return self._sample_factors[self._sample_variant.repeat(batch // b), scope_i].to(device)

    def clear_live_gates(self) -> None:
        self.live_gates.clear()

    def scope_gate(self, scope: str) -> ScopeGate:
        return self.gates[f"s{self.scope_names.index(scope)}"]

    # ----- static weights per scope (bake / export) -----
    def scope_weights(self, per_scope: dict[str, list[float]] | None = None) -> dict[str, torch.Tensor]:
        """Gate vector ``(N,)`` per scope for merging: static/uniform mode, given ``per_scope``,
        or (gated mode) the mean gates recorded in :attr:`stats` (calibration)."""
        if per_scope is None and self._mode != "gated":
            return {s: self._static[0].clone() for s in self.scopes}
        if per_scope is None:
            per_scope = self.stats.mean_gates()
            if not per_scope:
                raise MoleError("gated mixture has no recorded gate statistics: run a few sampling steps "
                                "(calibration) or give per-scope weights")
        missing = [s for s in self.scopes if s not in per_scope]
        if missing:
            raise MoleError(f"no weights for scope {missing[0]} ({len(missing)} scopes missing)")
        return {s: torch.tensor(per_scope[s], dtype=torch.float32) for s in self.scopes}

    def rank_coefficients(self, per_scope: dict[str, list[float]] | None = None) -> dict[str, torch.Tensor]:
        """Per target, the coefficient ``(R,)`` of every rank row: λ · w_scope · strength."""
        weights = self.scope_weights(per_scope)
        out = {}
        for scope in self.scopes.values():
            w = weights[scope.name] * self._scale_n
            for t in scope.targets:
                out[t] = w[self.banks[t].seg]
        return out

    def merged_deltas(self, per_scope: dict[str, list[float]] | None = None) -> dict[str, torch.Tensor]:
        """Dense weight deltas (fp32) per target that reproduce the static mixture exactly."""
        coefs = self.rank_coefficients(per_scope)
        return {t: self.banks[t].delta_weight(c) for t, c in coefs.items()}

    # ----- lifecycle -----
    def to(self, device: torch.device | str) -> Mixture:
        self.gates.to(device)
        return self

    def detach(self) -> None:
        """Remove every hook (idempotent). Outputs become bit-identical to the bare model."""
        while self._handles:
            self._handles.pop().remove()
        self.live_gates.clear()
        self._prompt = None
        for s in self.scopes.values():
            s.gate = None

    def reattach(self) -> None:
        """Install the hooks again after :meth:`detach` (idempotent; hosts that inject/eject
        around each use, like ComfyUI's ``PatcherInjection``, keep one Mixture and call this)."""
        self._attach_hooks()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Mixture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def describe(self) -> dict:
        """JSON-able summary (experts, targets, scopes) for logs, gate files and UIs."""
        return {"experts": [e.summary() for e in self.experts], "granularity": self.config.granularity,
                "gate_input": self.config.gate_input, "targets": len(self.banks), "scopes": len(self.scopes),
                "family": self.index.family, "matches": [r.line() for r in self.reports]}
