"""Zero-shot evaluation through lm-evaluation-harness (see tools/eval_harness.py)."""
