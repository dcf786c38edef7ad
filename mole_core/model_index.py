"""Find target layers of a live model by canonical name (no diffusers/transformers import)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .errors import MoleError
from .naming import COMPONENTS, module_to_canonical

_PIPE_ATTRS = {"unet": "unet", "te": "text_encoder", "te2": "text_encoder_2"}


@dataclass
class ModelIndex:
    """Canonical name → Linear/Conv2d module, plus each component's root module.

    Hosts other than diffusers (ComfyUI) build one from their own key maps.
    """

    modules: dict[str, nn.Module]
    roots: dict[str, nn.Module] = field(default_factory=dict)
    family: str = "unknown"

    def components(self) -> list[str]:
        return [c for c in COMPONENTS if c in self.roots or any(k.startswith(c + ":") for k in self.modules)]


def _guess_component(module: nn.Module) -> str:
    names = {n for n, _ in module.named_children()}
    if "text_model" in names or ("encoder" in names and "embeddings" in names):
        return "te"
    return "unet"


def index_module(module: nn.Module, component: str) -> dict[str, nn.Module]:
    """All Linear/Conv2d layers of one model under canonical names."""
    if component not in COMPONENTS:
        raise MoleError(f"`component` must be one of {COMPONENTS}, got {component!r}")
    return {module_to_canonical(component, n): m for n, m in module.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def detect_family(index: ModelIndex) -> str:
    """``sdxl`` (two text encoders), ``sd2`` (Linear proj_in) or ``sd1`` (conv proj_in)."""
    if "te2" in index.roots:
        return "sdxl"
    proj = next((m for k, m in index.modules.items() if k.startswith("unet:") and k.endswith("proj_in")), None)
    if proj is None:
        return "unknown"
    return "sd2" if isinstance(proj, nn.Linear) else "sd1"


def index_model(model: object, component: str | None = None) -> ModelIndex:
    """Index a diffusers pipeline (``.unet``, ``.text_encoder``, ``.text_encoder_2``), a dict
    ``{component: module}``, a single ``nn.Module`` (component guessed unless given) or a ModelIndex."""
    if isinstance(model, ModelIndex):
        return model
    roots: dict[str, nn.Module] = {}
    if isinstance(model, dict):
        roots = {c: m for c, m in model.items() if m is not None}
    elif isinstance(model, nn.Module):
        roots = {component or _guess_component(model): model}
    else:
        roots = {c: getattr(model, a) for c, a in _PIPE_ATTRS.items() if getattr(model, a, None) is not None}
    if not roots:
        raise MoleError(f"cannot find a UNet or text encoder in {type(model).__name__}")
    modules: dict[str, nn.Module] = {}
    for comp, root in roots.items():
        if not isinstance(root, nn.Module):
            raise MoleError(f"component {comp!r} is a {type(root).__name__}, expected a torch nn.Module")
        modules.update(index_module(root, comp))
    index = ModelIndex(modules=modules, roots=roots)
    index.family = detect_family(index)
    return index
