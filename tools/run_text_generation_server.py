#!/usr/bin/env python3
"""Serve a checkpoint (dense, MoE, PR-MoE, MoS; saved at any layout) over HTTP with continuous batching.

    python tools/run_text_generation_server.py --load CKPT [--host 127.0.0.1 --port 5000] \\
        [--max-batch-size 16] [--max-waiting-requests 64] [--moe-eval-capacity-factor CF] [--request-timeout 10]
    torchrun --nproc_per_node 2 tools/run_text_generation_server.py --load CKPT --moe-expert-parallel-size 2

Endpoints: PUT /api (Megatron), POST /v1/completions (OpenAI, with "stream": true for server-sent
events), GET /health, GET /v1/models, and GET /tokenizer_info, POST /tokenize, POST /detokenize.
With --moe-expert-parallel-size N each of the N ranks holds 1/N of every layer's experts; rank 0
serves HTTP and broadcasts each batch operation; the other ranks follow. SIGTERM (or Ctrl-C)
finishes the requests in flight, then exits 0.
"""
from __future__ import annotations

import functools
import os
import signal
import socket
from types import SimpleNamespace

import torch

from megatron.checkpoint.stored_config import read_checkpoint_config
from megatron.config.schema import ModelConfig
from megatron.errors import UserError, run_cli
from megatron.inference.devices import check_device
from megatron.inference.load import load_model
from megatron.training.arguments import argument_parser


def parse(argv=None):
    p = argument_parser(description=__doc__)
    p.add_argument("--load", required=True, help="checkpoint directory (the --save of training)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--max-batch-size", type=int, default=16, help="rows decoded together (1 = one request at a time)")
    p.add_argument("--max-waiting-requests", type=int, default=64,
                   help="requests queued beyond the running batch; more are answered 503")
    p.add_argument("--moe-expert-parallel-size", type=int, default=1,
                   help="spread each layer's experts over this many ranks (launch with torchrun)")
    p.add_argument("--moe-eval-capacity-factor", type=float, default=None,
                   help="drop tokens at this capacity factor (default: no token is dropped)")
    p.add_argument("--request-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request headers (after connecting or after its previous "
                        "response) and again its body; a slower connection is closed (408 for a late body)")
    p.add_argument("--model-name", default=None, help="the id in /v1/models (default: the checkpoint folder's name)")
    p.add_argument("--device", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--log-requests", action="store_true", help="uvicorn's access log")
    p.add_argument("--vocab-file"), p.add_argument("--merge-file"), p.add_argument("--tokenizer-model")
    a = p.parse_args(argv)
    if a.max_batch_size < 1 or a.max_waiting_requests < 1:
        raise UserError("--max-batch-size and --max-waiting-requests must be >= 1")
    if not 0 < a.request_timeout < float("inf"):
        raise UserError(f"--request-timeout {a.request_timeout}: must be a number of seconds > 0")
    if not 0 <= a.port < 65536:
        raise UserError(f"--port {a.port}: not a port number")
    a.device = check_device(a.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.moe_expert_parallel_size < 1 or world % a.moe_expert_parallel_size or \
            (world > 1 and a.moe_expert_parallel_size != world):
        raise UserError(f"--moe-expert-parallel-size {a.moe_expert_parallel_size}: must equal the number of "
                        f"processes ({world}); launch with torchrun --nproc_per_node {a.moe_expert_parallel_size}")
    return a


def check_port(host: str, port: int) -> None:
    """Fail before the model loads if the address cannot be listened on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                            f"choose another --port") from None


def main(argv=None) -> int:
    a = parse(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        check_port(a.host, a.port)
    from megatron.inference.serving.distributed import BroadcastBatchState, follow
    from megatron.parallel.state import destroy, initialize

    _, common = read_checkpoint_config(a.load)
    stored = ModelConfig.from_dict(common["config"]["model"])
    stored.moe.expert_parallel_size = a.moe_expert_parallel_size  # the degrees of this launch's EP size
    ps = initialize(SimpleNamespace(use_cpu=a.device == "cpu", distributed_backend=None, tensor_model_parallel_size=1),
                    a.moe_expert_parallel_size, layer_ep_sizes=stored.moe.layer_ep_sizes(stored.num_layers))
    try:
        lm = load_model(a.load, a.device, a.moe_eval_capacity_factor, torch.bfloat16 if a.bf16 else None,
                        a.vocab_file, a.merge_file, a.tokenizer_model, ps=ps if ps.world_size > 1 else None)
        if ps.rank != 0:
            ignore_stop_signals()  # rank 0 drains, then sends STOP
            follow(lm.model, ps.device)
            return 0
        state = BroadcastBatchState(lm.model, ps.device) if ps.world_size > 1 else None
        return serve(a, lm, state)
    finally:
        destroy(ps)


def ignore_stop_signals() -> None:
    """SIGTERM / SIGINT do nothing here: uvicorn handles them while it runs (draining open requests) and
    re-raises them when it returns, which would otherwise kill the process before it stops cleanly."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


def serve(a, lm, state=None) -> int:
    import uvicorn

    from megatron.inference.serving.app import Server, build_app, text_of
    from megatron.inference.serving.engine import Engine
    from megatron.inference.serving.timeouts import header_timeout_protocol

    tok = lm.tokenizer
    max_length = lm.cfg.max_position_embeddings
    engine = Engine(lm.model, tok.eod, max_length, functools.partial(text_of, tok), a.max_batch_size, a.max_waiting_requests,
                    state=state).start()
    name = a.model_name or os.path.basename(os.path.normpath(a.load))
    server = Server(engine, tok, max_length, lm.cfg.vocab_size, name, read_timeout=a.request_timeout)
    app = build_app(server)
    held = [(m.experts.num_local, m.num_experts) for m in lm.model.moe_layers()]
    print(f"> serving {lm.path} (iteration {lm.iteration}) as '{name}' on http://{a.host}:{a.port} "
          f"(max batch {a.max_batch_size}, context {max_length}, EP {a.moe_expert_parallel_size}"
          + (f"; each rank holds {held[0][0]} of {held[0][1]} experts per MoE layer" if held else "") + ")", flush=True)
    ignore_stop_signals()
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=a.log_requests,
                timeout_graceful_shutdown=60, http=header_timeout_protocol(a.request_timeout))
    engine.shutdown()  # uvicorn has drained the open requests; the engine finishes anything left, then stops
    print("> server stopped", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
