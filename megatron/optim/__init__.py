"""Optimizers: parameter groups, AdamW and the ZeRO-1 / ZeRO-2 sharded variants (build.py chooses), LR schedule, loss scaler."""
