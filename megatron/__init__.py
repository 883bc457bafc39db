"""Megatron-style GPT pretraining with DeepSpeed-MoE (standard MoE, PR-MoE, MoS)."""
__version__ = "0.1.0"
