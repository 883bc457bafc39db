#!/usr/bin/env python3
"""Serving throughput and latency: a bounded load generator against the HTTP server on loopback.

    python tools/bench/serving.py [--concurrency 1,4,16,64] [--requests-per-client 1] [--max-tokens 48] \
        [--prompt-tokens 8,32] [--models dense,MoE-8] [--modes continuous,single] [--rounds 1]
    python tools/bench/serving.py --models dense,MoE-8,dense-4x --modes continuous --concurrency 1,16 --rounds 5

Models (random weights; speed only; 6 layers, 8 heads, vocab 8192, context 512):
- ``dense``: hidden 256;
- ``MoE-8``: the same with 8 experts in every other layer (top-1, no token dropping): the same
  parameters per token as ``dense``, about 2.6x its parameters in all;
- ``dense-4x``: hidden 512, about 4x MoE-8's non-embedding parameters per token: the "quality-equivalent"
  dense model of the DeepSpeed-MoE paper's inference comparison (there a 1.3B-base MoE-128 matched a
  6.7B dense model, ~5x its parameters per token). Here quality is not measured: the comparison is of
  serving cost at the parameter ratio the paper reports.
Each model is served by the real app (FastAPI + uvicorn on 127.0.0.1), all servers in one child process
(the clients run in this one, so they do not compete with the engines for the interpreter), in the
chosen modes: ``continuous`` (continuous batching, up to 64 rows) and ``single`` (one request at a time,
--max-batch-size 1). For each concurrency level C, C client threads each send ``--requests-per-client``
greedy completions (prompts of ``--prompt-tokens`` random tokens, ``--max-tokens`` new tokens, no early
stop) one after another; the servers take turns at each level (``--rounds`` times), so a noisy machine
affects them alike. Reported: generated tokens/s over the level's wall time (the median round), and p50 /
p99 of the request latency (all rounds).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import requests  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402

from megatron.config.schema import ModelConfig, MoEConfig  # noqa: E402
from megatron.inference.serving.app import Server, build_app  # noqa: E402
from megatron.inference.serving.engine import Engine  # noqa: E402
from megatron.model.gpt_model import GPTModel  # noqa: E402
from megatron.tokenizer import build_tokenizer  # noqa: E402

VOCAB, CONTEXT = 8192, 512


MODELS = {  # name -> (hidden size, experts in every other layer)
    "dense": (256, 1),
    "MoE-8": (256, 8),
    "dense-4x": (512, 1),
}
MODES = {"continuous": ("continuous batching", 64), "single": ("one at a time", 1)}


def build(name: str) -> GPTModel:
    hidden, experts = MODELS[name]
    cfg = ModelConfig(num_layers=6, hidden_size=hidden, num_attention_heads=8, vocab_size=VOCAB, seq_length=CONTEXT,
                      hidden_dropout=0.0, attention_dropout=0.0,
                      moe=MoEConfig(num_experts=[experts], token_dropping=False))
    m = GPTModel(cfg)
    m.init_weights(1)
    return m.eval()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_all(ports: list, servers: list, threads: int) -> None:
    """Child process: one uvicorn server per (model, mode, max batch size), each on its own thread, until killed."""
    torch.set_num_threads(threads)
    tok = build_tokenizer("NullTokenizer", vocab_size=VOCAB)
    models = {name: build(name) for name in dict.fromkeys(name for name, _, _ in servers)}
    running = []
    for port, (name, _, mbs) in zip(ports, servers):
        engine = Engine(models[name], -1, CONTEXT, tok.detokenize, mbs, max_waiting=256).start()  # -1: no early stop
        app = build_app(Server(engine, tok, CONTEXT, VOCAB, name))
        running.append(uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")))
        threading.Thread(target=running[-1].run, daemon=True).start()
    while True:
        time.sleep(3600)


def wait_ready(port: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not start")


def load(url: str, clients: int, per_client: int, max_tokens: int, seed: int, prompt_tokens=(16, 64)):
    """``clients`` threads, each ``per_client`` requests in a row -> (tokens/s, latencies in s)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(*prompt_tokens))] for _ in range(clients * per_client)]
    latencies, tokens, errors = [], [0], []
    lock = threading.Lock()

    def client(k):
        with requests.Session() as s:
            for j in range(per_client):
                t0 = time.perf_counter()
                r = s.post(url, json={"prompt": prompts[k * per_client + j], "max_tokens": max_tokens,
                                      "temperature": 0}, timeout=600)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(r.text)
                        continue
                    latencies.append(dt)
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return tokens[0] / wall, latencies


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def parameter_table(names) -> None:
    from megatron.planning.model_stats import count_parameters

    print("| model | hidden | experts | parameters | parameters per token | non-embedding per token |\n|---|---|---|---|---|---|")
    for name in names:
        cfg = build(name).cfg
        c = count_parameters(cfg)
        print(f"| {name} | {cfg.hidden_size} | {MODELS[name][1]} | {c.total / 1e6:.1f}M | {c.active / 1e6:.1f}M | "
              f"{(c.active - c.embedding) / 1e6:.1f}M |")
    print()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests-per-client", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--prompt-tokens", default="8,32", help="prompt lengths are drawn uniformly from this range")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the servers")
    p.add_argument("--models", default="dense,MoE-8", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--modes", default="continuous,single", help="comma list of continuous, single")
    p.add_argument("--rounds", type=int, default=1, help="repeat each level this many times (servers taking turns); "
                   "tokens/s is the median round, latencies are pooled")
    a = p.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    lengths = tuple(int(x) for x in a.prompt_tokens.split(","))
    names, modes = a.models.split(","), [MODES[m][0] for m in a.modes.split(",")]
    if any(n not in MODELS for n in names):
        p.error(f"--models {a.models}: choose from {', '.join(MODELS)}")
    servers = [(name, mode, mbs) for name in names for key, (mode, mbs) in MODES.items() if mode in modes]
    ports = [free_port() for _ in servers]
    child = multiprocessing.get_context("spawn").Process(target=serve_all, args=(ports, servers, a.threads), daemon=True)
    child.start()
    urls = {}
    for port, (name, mode, _) in zip(ports, servers):
        wait_ready(port)
        urls[(name, mode)] = f"http://127.0.0.1:{port}/v1/completions"
    print(f"torch {torch.__version__}, {a.threads} torch thread(s); {a.requests_per_client} requests per client, "
          f"prompts of {lengths[0]}-{lengths[1]} tokens, {a.max_tokens} new tokens each\n")
    parameter_table(names)
    print("| model | serving | clients | tokens/s | p50 latency (s) | p99 latency (s) |\n|---|---|---|---|---|---|")
    tps, p50 = {}, {}
    try:
        for url in urls.values():  # warm-up
            load(url, 2, 1, 4, seed=0)
        for c in levels:
            rates, lats = {key: [] for key in urls}, {key: [] for key in urls}
            for r in range(a.rounds):  # the servers take turns, round after round
                for key, url in urls.items():
                    rate, lat = load(url, c, a.requests_per_client, a.max_tokens, seed=c + 1000 * r,
                                     prompt_tokens=lengths)
                    rates[key].append(rate)
                    lats[key] += lat
            for (name, mode), url in urls.items():
                rate, lat = statistics.median(rates[(name, mode)]), lats[(name, mode)]
                tps[(name, mode, c)], p50[(name, mode, c)] = rate, statistics.median(lat)
                print(f"| {name} | {mode} | {c} | {rate:.0f} | {p50[(name, mode, c)]:.2f} | {pct(lat, 0.99):.2f} |",
                      flush=True)
    finally:
        child.kill()
    cb, one = MODES["continuous"][0], MODES["single"][0]
    if cb in modes and one in modes:
        print("\n| model | clients | continuous batching / one at a time (tokens/s) |\n|---|---|---|")
        for name in names:
            for c in levels:
                print(f"| {name} | {c} | {tps[(name, cb, c)] / tps[(name, one, c)]:.2f}x |")
    mode = cb if cb in modes else one
    for other in ("dense", "dense-4x"):
        if "MoE-8" in names and other in names:
            print(f"\n| clients | MoE-8 / {other} tokens/s ({mode}) | MoE-8 / {other} p50 latency |\n|---|---|---|")
            for c in levels:
                print(f"| {c} | {tps[('MoE-8', mode, c)] / tps[(other, mode, c)]:.2f} | "
                      f"{p50[('MoE-8', mode, c)] / p50[(other, mode, c)]:.2f} |")


if __name__ == "__main__":
    main()
