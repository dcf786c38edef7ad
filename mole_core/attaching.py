"""``attach``: the one call a front end makes — index the model, build the :class:`~mole_core.mixture.Mixture`,
load a gate file into it. (Separate from ``mixture.py`` so that the gate-file module, which reads mixtures,
and the mixture module do not import each other.)"""

from __future__ import annotations

from .expert import Expert
from .gate_file import GateFile, apply_gate_file, read_gate_file
from .gates import GateConfig
from .mixture import Mixture
from .model_index import index_model
from .routes import RouteTable


def attach(model: object, experts: list[Expert], gate_config: GateConfig | None = None, *,
           gates: object | None = None, mode: str = "gated", weights: list[float] | None = None,
           mask: list[bool] | None = None, strength: float = 1.0, components: list[str] | None = None,
           match: str = "hash", hooks: bool = True, routes: RouteTable | None = None) -> Mixture:
    """Attach experts to a model (diffusers pipeline, UNet, text encoder, dict or ModelIndex).

    Args:
        model: what to attach to; see :func:`mole_core.model_index.index_model`.
        experts: loaded experts (:func:`mole_core.load_experts`), in gate order.
        gate_config: gate shape; ignored when ``gates`` is given (the file's config is used).
        gates: a gate file path or a :class:`~mole_core.gate_file.GateFile` (checked against the experts).
        mode: ``gated`` | ``uniform`` (NLA) | ``static`` (``weights``).
        mask: experts on/off (masking mode renormalises the gates).
        strength: mixture strength λ.
        components: subset of ``unet``, ``te``, ``te2`` to attach to (default: all found).
        match: how a gate file's experts are checked: ``hash`` (default) or ``name``.
        hooks: install the hooks now (False: build only; hosts call :meth:`Mixture.reattach` later).
        routes: ``gate_input="router"`` on a UNet-only mixture: the text encoders' mixture's
            :attr:`Mixture.routes` (the router runs there).
    """
    index = index_model(model)
    gf = None
    if gates is not None:
        gf = gates if isinstance(gates, GateFile) else read_gate_file(gates)
        gate_config = gf.config
    mix = Mixture(index, experts, gate_config, mode=mode, weights=weights, mask=mask, strength=strength,
                  components=components, hooks=hooks, routes=routes)
    if gf is not None:
        try:
            apply_gate_file(mix, gf, match=match)
        except Exception:
            mix.detach()
            raise
    return mix
