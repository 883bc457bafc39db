"""Norm layers: NVIDIA apex's fused LayerNorm when importable, torch's otherwise; RMSNorm (Llama's)."""
import torch
import torch.nn as nn

try:  # pragma: no cover - apex is not installable on the CI machines
    from apex.normalization import FusedLayerNorm as _ApexLayerNorm

    HAVE_APEX = True
except Exception:  # ImportError, or a broken apex build
    _ApexLayerNorm = None
    HAVE_APEX = False


def layer_norm(hidden_size: int, eps: float) -> nn.Module:
    if HAVE_APEX:
        return _ApexLayerNorm(hidden_size, eps=eps)
    return nn.LayerNorm(hidden_size, eps=eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32 and cast back before the weight
    (transformers' LlamaRMSNorm, bit for bit). Weight only, initialised to 1."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()  # [..., H]
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def norm(kind: str, hidden_size: int, eps: float) -> nn.Module:
    """The norm named by --normalization: ``LayerNorm`` (weight and bias) or ``RMSNorm`` (weight)."""
    if kind == "RMSNorm":
        return RMSNorm(hidden_size, eps)
    if kind == "LayerNorm":
        return layer_norm(hidden_size, eps)
    raise ValueError(f"unknown normalization {kind!r}")


def is_norm(module: nn.Module) -> bool:
    """A norm layer (its weight starts at 1, its bias at 0)."""
    return isinstance(module, (nn.LayerNorm, RMSNorm, nn.RMSNorm)) or type(module).__name__ in (
        "FusedLayerNorm", "FusedRMSNorm")
