#!/usr/bin/env python3
"""tools/preprocess_data.py MB/s with the fast (tiktoken) and the pure-Python GPT-2 BPE, side by side.

    python tools/bench/preprocess_throughput.py --input ../shared/data/corpus/gutenberg/train.txt --mb 4 --workers 2

Takes the first --mb MB of --input, runs the real command line in subprocesses (alternating the two
tokenizers, --repeats rounds, median), and checks that both write identical .bin/.idx bytes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tools.bench.common import cpu_name  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", required=True)
    p.add_argument("--mb", type=float, default=4.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--vocab-file", default=os.path.join(ROOT, "..", "shared", "data", "gpt2", "gpt2-vocab.json"))
    p.add_argument("--merge-file", default=os.path.join(ROOT, "..", "shared", "data", "gpt2", "gpt2-merges.txt"))
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        sample = os.path.join(d, "sample.txt")
        with open(a.input, "rb") as f:
            data = f.read(int(a.mb * 1e6))
        data = data[:len(data.decode("utf-8", errors="ignore").encode("utf-8"))]  # whole characters only
        with open(sample, "wb") as f:
            f.write(data)
        tiny = os.path.join(d, "tiny.txt")  # start-up only: interpreter, imports, tokenizers in 1 + workers processes
        with open(tiny, "w", encoding="utf-8") as f:
            f.write("A few words.\n")
        times = {"fast": [], "python": []}
        startup = {"fast": [], "python": []}

        def run(kind, inp, prefix):
            env = dict(os.environ, OMP_NUM_THREADS="1")
            if kind == "python":
                env["MEGATRON_PYTHON_BPE"] = "1"
            cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", inp,
                   "--output-prefix", os.path.join(d, prefix), "--tokenizer-type", "GPT2BPETokenizer",
                   "--vocab-file", a.vocab_file, "--merge-file", a.merge_file, "--append-eod",
                   "--workers", str(a.workers), "--quiet"]
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            return time.perf_counter() - t0

        for _ in range(a.repeats):
            for kind in times:
                times[kind].append(run(kind, sample, kind))
                startup[kind].append(run(kind, tiny, "tiny_" + kind))
        same = all(open(os.path.join(d, f"fast_text_document{e}"), "rb").read()
                   == open(os.path.join(d, f"python_text_document{e}"), "rb").read() for e in (".bin", ".idx"))
    mb = len(data) / 1e6
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    st = {k: sorted(v)[len(v) // 2] for k, v in startup.items()}
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; input {mb:.1f} MB of {os.path.basename(a.input)}, "
          f"{a.workers} workers, whole command (start-up included)")
    for k in ("python", "fast"):
        print(f"  {k:7s} {med[k]:7.1f} s  {mb / med[k]:6.2f} MB/s whole command; start-up {st[k]:.1f} s; "
              f"{mb / max(med[k] - st[k], 1e-9):6.2f} MB/s after start-up")
    print(f"  speed-up {med['python'] / med['fast']:.1f}x whole command, "
          f"{(med['python'] - st['python']) / max(med['fast'] - st['fast'], 1e-9):.1f}x after start-up; "
          f"identical .bin/.idx bytes: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
