"""The text-generation server: the continuous-batching engine against one-prompt generation, every endpoint
of tools/run_text_generation_server.py (a real process on 127.0.0.1, a free port), the bad-request
catalogue, the bounded queue, client disconnects, and SIGTERM draining."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

import pretrain_gpt_moe
from megatron.inference.generate import generate
from megatron.inference.load import load_model
from megatron.inference.serving.engine import Engine, Request, SamplingParams
from tests.conftest import ROOT
from tests.dist_utils import free_port
from tests.runs import mock_args

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CONTEXT = 1024  # long enough that a generation outlasts the client actions of the queue / disconnect tests
RUN = ["--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "3", "--seq-length", "32",
       "--max-position-embeddings", str(CONTEXT)]
MOE = ["--num-experts", "4", "--mlp-type", "residual", "--topk", "2"]
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [20], [9, 8, 7, 6], [3, 3, 3, 3, 3, 3, 3], [40, 41]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_ckpts")
    out = {}
    for name, extra in (("dense", []), ("moe", MOE)):
        out[name] = str(d / name)
        pretrain_gpt_moe.main(mock_args(RUN + extra + ["--save", out[name]]))
    return out


class Server:
    """tools/run_text_generation_server.py in a child process (or torchrun with ``nproc`` > 1)."""

    def __init__(self, load, *extra, nproc=1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["tools/run_text_generation_server.py", "--load", load, "--port", str(self.port), "--device", "cpu",
                *extra]
        if nproc > 1:
            args = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port()), *args]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise AssertionError("server did not start")

    def get(self, path, **kw):
        return requests.get(self.url + path, timeout=60, **kw)

    def post(self, path, body=None, data=None, **kw):
        return requests.post(self.url + path, json=body, data=data, timeout=120, **kw)

    def complete(self, **body):
        r = self.post("/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def servers(checkpoints):
    # the dense server drops clients that take more than 2 s to send their headers or body (test_slow_clients...)
    started = {kind: Server(path, *(["--request-timeout", "2"] if kind == "dense" else [])) for kind, path in
               checkpoints.items()}
    try:
        yield {kind: s.wait_ready() for kind, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


def send_together(s, bodies) -> list:
    """Every completion request at once (one thread each): the first choice of each."""
    out = [None] * len(bodies)

    def send(i):
        out[i] = s.complete(**bodies[i])["choices"][0]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def greedy(s, prompt, n, **kw):
    return s.complete(prompt=prompt, max_tokens=n, temperature=0, logprobs=0, **kw)["choices"][0]


# ---- the engine in this process


@torch.no_grad()
def forward_logp(model, ids) -> torch.Tensor:
    """Next-token log-probs [T, V] of one sequence, in one plain forward."""
    return torch.log_softmax(model.logits(torch.tensor([ids]))[0][0].float(), -1)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_engine_rows_joining_and_leaving_equal_one_prompt_at_a_time(checkpoints, kind):
    lm = load_model(checkpoints[kind], "cpu")
    eod = lm.tokenizer.eod
    engine = Engine(lm.model, eod, CONTEXT, lm.tokenizer.detokenize, max_batch_size=3)
    greedy_reqs = [Request(p, SamplingParams(max_new_tokens=4 + 3 * i, logprobs=0)) for i, p in enumerate(PROMPTS)]
    sampled = [Request(p, SamplingParams(max_new_tokens=9, temperature=1.0, top_k=20, top_p=0.9, seed=3 + i))
               for i, p in enumerate(PROMPTS[:3])]
    for r in greedy_reqs[:2]:
        engine.submit(r)
    engine.step(), engine.step()  # two rows decoding when the rest arrive (at most 3 rows at a time)
    for r in greedy_reqs[2:] + sampled:
        engine.submit(r)
    max_rows = 0
    while engine.waiting or engine.running:
        engine.step()
        max_rows = max(max_rows, engine.state.rows)
        assert engine.state.length <= max(len(r.prompt) + len(r.tokens) for r in engine.running) if engine.running \
            else engine.state.rows == 0  # freed rows leave no columns behind
    assert max_rows == 3
    for i, r in enumerate(greedy_reqs):
        assert r.tokens == generate(lm.model, r.prompt, 4 + 3 * i, eod=eod)
        assert r.finish_reason in ("length", "stop")
        # each token's log-prob is the one-prompt forward's
        logp = forward_logp(lm.model, r.prompt + r.tokens[:-1])
        direct = [float(logp[len(r.prompt) - 1 + j, t]) for j, t in enumerate(r.tokens)]
        assert max(abs(a - b) for a, b in zip(r.token_logprobs, direct)) < 1e-4
    for i, r in enumerate(sampled):
        g = torch.Generator().manual_seed(3 + i)
        assert r.tokens == generate(lm.model, r.prompt, 9, temperature=1.0, top_k=20, top_p=0.9, eod=eod, generator=g)


# ---- endpoints


def test_health_models_and_tokenizer_endpoints(servers):
    s = servers["moe"]
    assert s.get("/health").json()["status"] == "ok"
    assert s.get("/v1/models").json()["data"][0]["id"] == "moe"
    info = s.get("/tokenizer_info").json()
    assert info["eos_token"] == "127" and info["model_max_length"] == CONTEXT  # NullTokenizer: ids are the text
    assert s.post("/tokenize", {"prompt": "4 5 127"}).json()["tokens"] == [4, 5, 127]
    r = s.post("/tokenize", {"prompt": "4 5 1127"})  # an id past the vocabulary (128) is refused, naming it
    assert r.status_code == 400 and "1127" in r.text, r.text
    assert s.post("/detokenize", {"tokens": [4, 5]}).json()["prompt"] == "4 5"


def test_megatron_api_equals_generate(servers, checkpoints):
    s, lm = servers["moe"], load_model(checkpoints["moe"], "cpu")
    r = requests.put(s.url + "/api", json={"prompts": ["1 2 3", "7 8"], "tokens_to_generate": 6, "temperature": 0,
                                           "logprobs": True}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    for prompt, tokens, text, lps in zip([[1, 2, 3], [7, 8]], out["tokens"], out["text"], out["logprobs"]):
        new = generate(lm.model, prompt, 6, eod=lm.tokenizer.eod)
        assert tokens == prompt + new and text == " ".join(map(str, prompt + new))
        logp = forward_logp(lm.model, tokens[:-1])
        assert max(abs(a - float(logp[j, t])) for j, (a, t) in enumerate(zip(lps, tokens[1:]))) < 1e-4
    # scoring only: tokens_to_generate 0 with logprobs
    score = requests.put(s.url + "/api", json={"prompts": ["1 2 3"], "tokens_to_generate": 0, "logprobs": True},
                         timeout=60).json()
    assert score["tokens"] == [[1, 2, 3]] and len(score["logprobs"][0]) == 2
    assert score["logprobs"][0] == pytest.approx(out["logprobs"][0][:2], abs=1e-5)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_concurrent_requests_equal_single_requests(servers, kind):
    """Greedy and seeded sampled requests sent together (one batch) give what each gives alone."""
    s = servers[kind]
    bodies = [dict(prompt=" ".join(map(str, p)), max_tokens=5 + 2 * i, temperature=0 if i % 2 == 0 else 0.9,
                   seed=100 + i, top_p=0.95, logprobs=0) for i, p in enumerate(PROMPTS)]
    alone = [s.complete(**b)["choices"][0] for b in bodies]
    for a, b in zip(alone, send_together(s, bodies)):
        assert a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]
        assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-4)


def test_echo_logprobs_score_the_prompt_like_a_forward(servers, checkpoints):
    s, lm = servers["dense"], load_model(checkpoints["dense"], "cpu")
    # what lm-eval's local-completions sends for a loglikelihood request
    out = s.complete(prompt=[[3, 9, 4, 4, 1, 8], [2, 7]], max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1)
    for ids, choice in zip([[3, 9, 4, 4, 1, 8], [2, 7]], out["choices"]):
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids) + 1
        logp = forward_logp(lm.model, ids)
        assert lp["token_logprobs"][1:-1] == pytest.approx([float(logp[j, t]) for j, t in enumerate(ids[1:])],
                                                           abs=1e-4)
        assert choice["text"].startswith(" ".join(map(str, ids)))
        top = lp["top_logprobs"][-1]
        assert max(top.values()) == lp["token_logprobs"][-1]  # the generated token is the argmax


def test_streaming_gives_the_same_text(servers):
    s = servers["moe"]
    body = dict(prompt="4 8 15 16", max_tokens=12, temperature=0.8, seed=5)
    whole = s.complete(**body)["choices"][0]
    r = requests.post(s.url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    text = "".join(c["text"] for ch in chunks for c in ch["choices"])
    assert text == whole["text"] and len(chunks) > 3
    assert [c["finish_reason"] for ch in chunks for c in ch["choices"]][-1] == whole["finish_reason"]


def test_stop_strings_and_tokens(servers):
    s = servers["dense"]
    free = greedy(s, "1 2 3", 8)
    toks = free["text"].split()
    cut = s.complete(prompt="1 2 3", max_tokens=8, temperature=0, stop=[f" {toks[2]}"])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == free["text"].split(f" {toks[2]}")[0]
    r = requests.put(s.url + "/api", json={"prompts": ["1 2 3"], "tokens_to_generate": 8, "temperature": 0,
                                           "stop_token": int(toks[-1])}, timeout=60).json()
    k = toks.index(toks[-1])  # the stop token's first occurrence ends the generation (and is kept)
    assert r["tokens"][0][3:] == [int(t) for t in toks[:k + 1]]


# ---- bad requests

LONG = " ".join(["5"] * (CONTEXT + 1))
CATALOGUE = [  # (method, path, body: dict or raw bytes, status, words in the message)
    ("post", "/v1/completions", b'{"prompt": "1 2",', 400, "not JSON"),
    ("post", "/v1/completions", b"\xff\xfe\x00garbage", 400, "not UTF-8"),
    ("post", "/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("post", "/v1/completions", {"max_tokens": 3}, 400, "'prompt' is required"),
    ("post", "/v1/completions", {"prompt": 5}, 400, "'prompt': must be"),
    ("post", "/v1/completions", {"prompt": "1", "max_tokens": "4"}, 400, "'max_tokens'"),
    ("post", "/v1/completions", {"prompt": "1", "max_tokens": 0}, 400, "'max_tokens'"),
    ("post", "/v1/completions", {"prompt": "1", "max_tokens": -3}, 400, "'max_tokens'"),
    ("post", "/v1/completions", {"prompt": "1", "max_tokens": CONTEXT}, 400, "past the model's context"),
    ("post", "/v1/completions", {"prompt": LONG, "max_tokens": 1}, 400, "context is 1024"),
    ("post", "/v1/completions", {"prompt": "", "max_tokens": 1}, 400, "empty"),
    ("post", "/v1/completions", {"prompt": [], "max_tokens": 1}, 400, "prompt"),
    ("post", "/v1/completions", {"prompt": "1", "temperature": -0.5}, 400, "'temperature'"),
    ("post", "/v1/completions", {"prompt": "1", "temperature": "hot"}, 400, "'temperature'"),
    ("post", "/v1/completions", {"prompt": "1", "top_p": 0}, 400, "'top_p'"),
    ("post", "/v1/completions", {"prompt": "1", "top_p": 1.5}, 400, "'top_p'"),
    ("post", "/v1/completions", {"prompt": "1", "logprobs": 99}, 400, "'logprobs'"),
    ("post", "/v1/completions", {"prompt": "1", "n": 3}, 400, "'n'"),
    ("post", "/v1/completions", {"prompt": "1", "stop": [""]}, 400, "'stop'"),
    ("post", "/v1/completions", {"prompt": [[1, 99999]]}, 400, "outside the vocabulary"),
    ("post", "/v1/completions", {"prompt": "not numbers"}, 400, "cannot be tokenized"),
    ("put", "/api", {"prompts": "1 2"}, 400, "'prompts'"),
    ("put", "/api", {"prompts": []}, 400, "'prompts'"),
    ("put", "/api", {"prompts": ["1"], "tokens_to_generate": 0}, 400, "logprobs"),
    ("put", "/api", {"prompts": ["1"], "top_p": 2.0}, 400, "'top_p'"),
    ("put", "/api", {"prompts": ["1"], "top_k": -1}, 400, "'top_k'"),
    ("put", "/api", {"prompts": ["1"], "add_BOS": "yes"}, 400, "'add_BOS'"),
    # issue 28: these were 500s with the raw exception's text
    ("put", "/api", {"prompts": ["1"], "stop": [""]}, 400, "'stop'"),
    ("post", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("post", "/v1/completions", b'{"prompt": "1", "max_tokens": ' + b"7" * 5000 + b"}", 400, "too many digits"),
    ("post", "/v1/completions", {"prompt": "1", "seed": 2**70}, 400, "'seed'"),
    ("post", "/v1/completions", {"prompt": "1", "seed": -(2**70)}, 400, "'seed'"),
    ("put", "/api", {"prompts": ["1"], "random_seed": 2**70}, 400, "'random_seed'"),
    ("post", "/v1/completions", b'{"prompt": "1", "temperature": NaN}', 400, "'temperature'"),
    ("post", "/v1/completions", b'{"prompt": "1", "temperature": Infinity}', 400, "'temperature'"),
    ("post", "/v1/completions", b'{"prompt": "1", "top_p": NaN}', 400, "'top_p'"),
    ("post", "/v1/completions", {"prompt": "1", "temperature": 1e300}, 400, "'temperature'"),
    ("post", "/v1/completions", {"prompt": "1", "max_tokens": 10**30}, 400, "'max_tokens'"),
    ("post", "/v1/completions", {"prompt": "1", "top_k": 10**30}, 400, "'top_k'"),
    ("put", "/api", {"prompts": ["1"], "stop_token": -1}, 400, "'stop_token'"),
    ("put", "/api", {"prompts": ["1"], "stop_token": [3, 2**70]}, 400, "'stop_token'"),
    ("post", "/tokenize", {"prompt": 3}, 400, "'prompt'"),
    ("post", "/detokenize", {"tokens": [-1]}, 400, "'tokens'"),
    ("get", "/no/such/endpoint", None, 404, ""),
]


def test_bad_requests_are_answered_and_the_next_request_is_served(servers):
    s = servers["moe"]
    reference = greedy(s, "2 4 6", 5)["text"]
    for method, path, body, status, words in CATALOGUE:
        kw = {"data": body} if isinstance(body, bytes) else {"json": body}
        r = requests.request(method, s.url + path, timeout=60, **kw)
        assert r.status_code == status, (path, body, r.status_code, r.text)
        if words:
            message = r.json()["error"]["message"]
            assert words in message and "\n" not in message, (body, message)
        assert greedy(s, "2 4 6", 5)["text"] == reference  # and the server still serves
    assert s.proc.poll() is None


def test_a_poisonous_request_does_not_fail_a_concurrent_greedy_one(servers, checkpoints):
    """Issue 28: temperature 1e-40 / 1e-300 and top_p 1e-300 made sampling raise, and the engine failed the
    whole batch (a greedy request from another client got a 500). Now they sample greedily / keep the top token,
    and the greedy request sharing their batch gets exactly its answer."""
    s, lm = servers["dense"], load_model(checkpoints["dense"], "cpu")
    prompt, n = [3, 1, 4, 1, 5], 300  # long enough (1 s or more) that the poisons join its batch
    expected = " ".join(map(str, generate(lm.model, prompt, n, eod=lm.tokenizer.eod)))
    result = {}
    t = threading.Thread(target=lambda: result.update(r=s.post("/v1/completions", {
        "prompt": prompt, "max_tokens": n, "temperature": 0})))
    t.start()
    deadline = time.time() + 60
    while s.get("/health").json()["running"] < 1 and time.time() < deadline:
        time.sleep(0.02)
    poisons = [{"temperature": 1e-40}, {"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300},
               {"temperature": 5e-324, "top_p": 5e-324, "top_k": 3}]
    answers = send_together(s, [dict(prompt=[9, 2, 6], max_tokens=6, seed=i, **p) for i, p in enumerate(poisons)])
    t.join(120)
    assert result["r"].status_code == 200, result["r"].text
    assert result["r"].json()["choices"][0]["text"] == expected
    greedy_poison = " ".join(map(str, generate(lm.model, [9, 2, 6], 6, eod=lm.tokenizer.eod)))
    assert all(a["text"] == greedy_poison for a in answers)  # each is greedy (top_p that small keeps one token)


def test_slow_clients_are_dropped_after_the_request_timeout(servers):
    """Issue 28: connections that never sent their headers were kept open forever (72 for 42 s). With
    --request-timeout 2: silent connections, half-sent headers and a stalled body are closed after ~2 s
    (the body with a 408), while a normal request is served."""
    import socket

    s = servers["dense"]
    socks = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(20)]
    half = socket.create_connection(("127.0.0.1", s.port))
    half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    body = socket.create_connection(("127.0.0.1", s.port))
    body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    start = time.time()
    assert greedy(s, "2 4 6", 3)["finish_reason"] in ("length", "stop")  # served meanwhile
    for sock in socks + [half, body]:
        sock.settimeout(15)
        data = b""
        while chunk := sock.recv(4096):  # until the server closes the connection
            data += chunk
        sock.close()
        if sock is body:
            assert data.startswith(b"HTTP/1.1 408") and b"within 2 s" in data, data
        else:
            assert data == b""
    assert time.time() - start < 8
    assert s.get("/health").status_code == 200


@pytest.mark.slow
def test_busy_server_queue_disconnect_and_sigterm(checkpoints):
    """One row, one waiting place: a third request is 503; a client that goes away frees its row;
    SIGTERM lets the request in flight finish, then the server exits 0."""
    s = Server(checkpoints["moe"], "--max-batch-size", "1", "--max-waiting-requests", "1").wait_ready()
    try:
        long_body = {"prompt": "1 2 3", "max_tokens": CONTEXT - 3, "temperature": 0, "stream": True}
        first = requests.post(s.url + "/v1/completions", json=long_body, stream=True, timeout=60)
        lines = first.iter_lines()
        assert next(lines).startswith(b"data: ")  # generating: the row is taken
        queued = threading.Thread(target=lambda: s.post("/v1/completions", {"prompt": "4", "max_tokens": 2}))
        queued.start()
        deadline = time.time() + 30
        while s.get("/health").json()["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        busy = s.post("/v1/completions", {"prompt": "4", "max_tokens": 2})
        assert busy.status_code == 503 and "busy" in busy.json()["error"]["message"]
        first.close()  # the client goes away mid-generation
        queued.join(60)
        health = s.get("/health").json()
        assert health["running"] == 0 and health["waiting"] == 0 and health["cancelled"] == 1
        served = s.complete(prompt="4", max_tokens=2, temperature=0)  # the freed row serves the next request
        assert served["choices"][0]["finish_reason"] in ("length", "stop") and served["usage"]["completion_tokens"] <= 2
        # SIGTERM while a request runs: it completes, then the server exits cleanly
        result = {}
        t = threading.Thread(target=lambda: result.update(r=s.post("/v1/completions", {**long_body, "stream": False})))
        t.start()
        while s.get("/health").json()["running"] < 1 and time.time() < deadline + 30:
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        t.join(120)
        code, out = s.stop()
        assert result["r"].status_code == 200 and len(result["r"].json()["choices"][0]["text"]) > 0
        assert code == 0 and "server stopped" in out, out
    finally:
        s.stop()


# ---- tools/generate_text.py (issue: empty and over-long prompts)


def test_generate_text_refuses_empty_and_too_long_prompts(checkpoints):
    from megatron.errors import UserError
    from tools import generate_text

    base = ["--load", checkpoints["dense"], "--device", "cpu", "--max-new-tokens", "2"]
    with pytest.raises(UserError, match="--prompt 1 is empty"):
        generate_text.main(base + ["--prompt", "3 4", "--prompt", "  "])
    with pytest.raises(UserError, match=f"context of {CONTEXT}"):
        generate_text.main(base + ["--prompt", LONG])
    assert len(generate_text.main(base + ["--prompt", "3 4"])["outputs"]) == 1


def test_server_tool_user_errors(checkpoints, tmp_path):
    from megatron.errors import UserError
    from tools import run_text_generation_server as tool

    with pytest.raises(UserError, match="--load .*no checkpoint"):
        tool.main(["--load", str(tmp_path), "--port", str(free_port())])
    with pytest.raises(UserError, match="--moe-expert-parallel-size 2: must equal the number of processes"):
        tool.main(["--load", checkpoints["moe"], "--moe-expert-parallel-size", "2"])
    with pytest.raises(UserError, match="--max-batch-size"):
        tool.main(["--load", checkpoints["moe"], "--max-batch-size", "0"])
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(UserError, match="--request-timeout"):
            tool.main(["--load", checkpoints["moe"], "--request-timeout", bad])
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"--port {port}: cannot listen there"):
            tool.main(["--load", checkpoints["moe"], "--port", str(port)])
