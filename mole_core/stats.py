"""Gate statistics recorded during forward passes, outside the parameter set."""

from __future__ import annotations

import torch


def timestep_bucket(t: torch.Tensor | float, buckets: int, t_max: float = 1000.0) -> int:
    """Timestep bucket of a model call, in sampling order: bucket 0 = the noisiest steps (``t`` near
    ``t_max``) … ``buckets - 1`` = the last steps (``t`` near 0). Every front end records with this."""
    if buckets <= 1:
        return 0
    tv = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
    return min(buckets - 1, max(0, int((1.0 - tv / t_max) * buckets)))


def bucket_label(bucket: int, buckets: int, t_max: float = 1000.0) -> str:
    """``"t 1000-750"`` for bucket 0 of 4."""
    hi = round(t_max * (buckets - bucket) / buckets)
    lo = round(t_max * (buckets - bucket - 1) / buckets)
    return f"t {hi}-{lo}"


def bucket_labels(buckets: int, t_max: float = 1000.0) -> dict[str, str]:
    """Labels of every bucket, keyed like :meth:`GateStats.summary`'s ``by_bucket``."""
    return {str(b): bucket_label(b, buckets, t_max) for b in range(buckets)}


class GateStats:
    """Running mean gate per expert and mean entropy, per scope and timestep bucket.

    Sums stay on the compute device (no host sync per call); :meth:`summary` reads them.
    Set :attr:`bucket` before a forward pass to bucket by timestep (ComfyUI: from sigma).
    """

    def __init__(self, n_experts: int):
        self.n = n_experts
        self.enabled = True
        self.bucket = 0
        self._sums: dict[tuple[str, int], torch.Tensor] = {}
        self._ent: dict[tuple[str, int], torch.Tensor] = {}
        self._count: dict[tuple[str, int], torch.Tensor] = {}  # tensors: no int guards under torch.compile

    def reset(self) -> None:
        self._sums.clear()
        self._ent.clear()
        self._count.clear()

    def record(self, scope: str, g: torch.Tensor) -> None:
        """Add gate rows ``g (B, N)`` of one scope."""
        if not self.enabled:
            return
        key = (scope, self.bucket)
        if g.requires_grad:  # few ops: this runs once per scope in every sampling forward
            g = g.detach()
        if g.dtype != torch.float32:
            g = g.float()
        n = g.new_full((), g.shape[0])
        ent = torch.special.entr(g / g.sum(-1, keepdim=True).clamp_min(1e-12)).sum()  # Σ rows' share entropy
        if key in self._sums:  # out of place: the sums may be inference tensors from a sampling pass
            self._sums[key] = self._sums[key] + g.sum(0)
            self._ent[key] = self._ent[key] + ent
            self._count[key] = self._count[key] + n
        else:
            self._sums[key] = g.sum(0)
            self._ent[key] = ent
            self._count[key] = n

    @property
    def empty(self) -> bool:
        return not self._count

    def buckets(self) -> list[int]:
        return sorted({b for _, b in self._count})

    def mean_gates(self, bucket: int | None = None) -> dict[str, list[float]]:
        """Mean gate vector per scope (all buckets pooled when ``bucket`` is None)."""
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for (scope, b), s in self._sums.items():
            if bucket is not None and b != bucket:
                continue
            sums[scope] = sums.get(scope, 0) + s.cpu()
            counts[scope] = counts.get(scope, 0) + int(self._count[(scope, b)])
        return {k: (v / counts[k]).tolist() for k, v in sums.items()}

    def mean_entropy(self) -> float:
        total = sum(int(c) for c in self._count.values())
        if not total:
            return float("nan")
        return float(sum(e.cpu() for e in self._ent.values()) / total)

    def summary(self) -> dict:
        """JSON-able: ``{"buckets": [...], "mean": {scope: [N]}, "by_bucket": {b: {scope: [N]}}, "entropy"}``."""
        return {"buckets": self.buckets(), "mean": self.mean_gates(),
                "by_bucket": {str(b): self.mean_gates(b) for b in self.buckets()},
                "entropy": self.mean_entropy(), "samples": sum(int(c) for c in self._count.values())}
