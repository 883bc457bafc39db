"""Expert capacity (DeepSpeed's ``_capacity``)."""
import math


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int, topk: int = 1) -> int:
    """C = max(ceil(S / E * k * cf), min_capacity): slots per expert for S tokens routed to k experts each."""
    return max(int(math.ceil(num_tokens / num_experts * capacity_factor * topk)), int(min_capacity))
