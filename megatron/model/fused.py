"""Use NVIDIA apex's fused kernels when importable, torch's otherwise."""
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
