"""Megatron-LM / Megatron-DeepSpeed compatibility: their flag names and the DeepSpeed JSON, read once into the config."""
