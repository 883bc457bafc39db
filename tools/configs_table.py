#!/usr/bin/env python3
"""Print the markdown table of the paper launch scripts (examples_moe/gpt_*.sh) from their --dry-run.

    python tools/configs_table.py > /tmp/table.md      # the table in docs/CONFIGURATIONS.md
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {"gpt_350M_dense": "350M", "gpt_1.3B_dense": "1.3B", "gpt_6.7B_dense": "6.7B", "gpt_350M_moe128": "13B",
         "gpt_1.3B_moe128": "52B", "gpt_6.7B_moe128": "-", "gpt_350M_prmoe": "4B", "gpt_1.3B_prmoe": "31B",
         "gpt_350M_mos": "3.5B", "gpt_1.3B_mos": "27B"}
SIZE = {"M": 1e6, "B": 1e9}


def human(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def grab(pattern, text):
    m = re.search(pattern, text, re.M)
    return m.group(1) if m else "?"


def main():
    rows = ["| script | total params (ours / paper) | diff | active params | GPUs (TP x DP, EP) | per GPU: weights + grads + Adam "
            "| activations / micro-batch (ckpt) | total per GPU (ZeRO-1) |", "|---|---|---|---|---|---|---|---|"]
    on_disk = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "examples_moe", "gpt_*.sh"))}
    for name in [n for n in PAPER if n in on_disk] + sorted(on_disk - set(PAPER)):
        path = os.path.join(ROOT, "examples_moe", name + ".sh")
        out = subprocess.run(["bash", path, "--dry-run"], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHON": sys.executable}).stdout
        total, active = int(grab(r"^total parameters: (\d+)", out)), int(grab(r"^active parameters: (\d+)", out))
        paper = PAPER.get(name, "-")
        diff = "" if paper == "-" else f"{100 * (total / (float(paper[:-1]) * SIZE[paper[-1]]) - 1):+.1f}%"
        layout = re.search(r"world (\d+) = TP (\d+) x DP (\d+) \(EP (\d+)", out).groups()
        w, g, o = (float(grab(rf"^  {k}.*?: +([\d.]+) GiB", out)) for k in ("weights", "gradients", "Adam"))
        act = grab(r", ([\d.]+) GiB with --checkpoint-activations", out)
        tot = re.search(r"total \(this configuration\): ([\d.]+) GiB \(.*with a sharded optimizer: ([\d.]+) GiB", out).groups()
        rows.append(f"| `{name}.sh` | {human(total)} / {paper} | {diff} | {human(active)} | {layout[0]} ({layout[1]} x "
                    f"{layout[2]}, EP {layout[3]}) | {w + g + o:.1f} GiB | {act} GiB | {tot[0]} GiB ({tot[1]} GiB) |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
