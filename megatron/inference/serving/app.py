"""The HTTP app (FastAPI): Megatron's ``PUT /api``, OpenAI's ``POST /v1/completions`` (with server-sent
events when ``stream`` is true), ``GET /health``, ``GET /v1/models``, and the tokenizer endpoints
(``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``) that lm-eval's ``local-completions``
uses as its "remote" tokenizer.

Every bad request is answered 4xx with ``{"error": {"message": ..., "type": ...}}`` and never reaches
the engine (a body too deep or with too long a number for the JSON reader included); a full waiting queue
is 503; a body that does not arrive within ``read_timeout`` is 408; a request that fails inside the engine
is 500 for that request alone; a client that goes away cancels its requests, whose rows the engine frees at
its next step.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Optional

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from megatron.inference.serving.engine import Engine, QueueFull, Request, SamplingParams
from megatron.inference.serving.schemas import CompletionRequest, MegatronRequest, first_error

MAX_BODY_BYTES = 4 << 20


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def error_response(message: str, status: int = 400, kind: str = "invalid_request_error") -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else {"Connection": "close"} if status == 408 else None
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


READ_TIMEOUT_S = 10.0  # a client must send its body within this (its headers: see serving/timeouts.py)


async def read_body(http: HTTPRequest, timeout: Optional[float] = READ_TIMEOUT_S) -> bytes:
    """The raw body, at most MAX_BODY_BYTES (413 from its Content-Length before reading), within ``timeout``
    seconds (408: a client that stalls mid-body does not hold its connection open)."""
    length = http.headers.get("content-length", "")
    if length.isdigit() and len(length) < 20 and int(length) > MAX_BODY_BYTES:
        raise BadRequest(f"the body is {int(length)} bytes; at most {MAX_BODY_BYTES}", 413)
    try:
        body = await asyncio.wait_for(http.body(), timeout)
    except asyncio.TimeoutError:
        raise BadRequest(f"the body did not arrive within {timeout:g} s", 408, "timeout") from None
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"the body is {len(body)} bytes; at most {MAX_BODY_BYTES}", 413)
    return body


async def read_object(http: HTTPRequest, timeout: Optional[float] = READ_TIMEOUT_S) -> dict:
    """The body as a JSON object, or BadRequest saying why not."""
    body = await read_body(http, timeout)
    try:
        obj = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRequest(f"the body is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"the body is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise BadRequest("the body is JSON nested too deeply") from None
    except ValueError:  # an integer of more than sys.get_int_max_str_digits() (4300) digits
        raise BadRequest("the body holds a number with too many digits") from None
    if not isinstance(obj, dict):
        raise BadRequest("the body must be a JSON object")
    return obj


async def read_json(http: HTTPRequest, schema, timeout: Optional[float] = READ_TIMEOUT_S):
    obj = await read_object(http, timeout)
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        raise BadRequest(first_error(e)) from None
    except RecursionError:  # nested within the parser's depth but past the validator's
        raise BadRequest("the body is JSON nested too deeply") from None


def one_line(text: str, limit: int = 500) -> str:
    return " ".join(str(text).split())[:limit]


def text_of(tokenizer, ids: list[int]) -> str:
    """Text of ``ids`` without end-of-document and without the vocabulary's padding ids (an untrained
    model may pick those: they have logits but no text)."""
    return tokenizer.detokenize([i for i in ids if i != tokenizer.eod and i < tokenizer.vocab_size])


class Server:
    """Glue between HTTP requests and the engine: tokenization, the context checks, responses."""

    def __init__(self, engine: Engine, tokenizer, max_length: int, vocab_size: int, model_name: str,
                 read_timeout: Optional[float] = READ_TIMEOUT_S):
        self.engine, self.tok, self.max_length = engine, tokenizer, max_length
        self.vocab_size, self.model_name, self.read_timeout = vocab_size, model_name, read_timeout
        self.eos_text = tokenizer.detokenize([tokenizer.eod])
        try:  # a special text such as "<|endoftext|>" that the tokenizer itself splits up
            self.split_eos = bool(self.eos_text) and tokenizer.tokenize(self.eos_text) != [tokenizer.eod]
        except Exception:
            self.split_eos = False

    # ---- tokens
    def encode(self, text: str) -> list[int]:
        """Text -> ids; the end-of-document text maps to its id (for clients that send it)."""
        ids: list[int] = []
        for k, part in enumerate(text.split(self.eos_text) if self.split_eos else [text]):
            if k:
                ids.append(self.tok.eod)
            if part:
                try:
                    ids += self.tok.tokenize(part)
                except Exception as e:
                    raise BadRequest(f"the prompt cannot be tokenized by this model's tokenizer "
                                     f"({one_line(e, 200)})") from None
        return ids

    def decode(self, ids: list[int]) -> str:
        return text_of(self.tok, ids)

    def token_text(self, i: int) -> str:
        return self.tok.detokenize([i]) if i < self.tok.vocab_size else ""

    def prompt_ids(self, prompt, what: str, new_tokens: int) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise BadRequest(f"{what} is empty: give at least one token")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise BadRequest(f"{what}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) > self.max_length:
            raise BadRequest(f"{what} is {len(ids)} tokens; the model's context is {self.max_length}")
        if len(ids) + new_tokens > self.max_length:
            raise BadRequest(f"{what} ({len(ids)} tokens) + {new_tokens} new tokens is past the model's context "
                             f"of {self.max_length}: ask for at most {self.max_length - len(ids)}")
        return ids

    # ---- running requests
    def submit(self, prompts: list[list[int]], params: list[SamplingParams], stream: bool = False):
        """The requests, and the queue of their (index, "token" | "done") events; "token" events only when
        ``stream`` (waking this event loop for every token of every row costs the engine's thread time)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def notify(req, kind, idx):
            if kind == "token" and not stream:
                return
            try:
                loop.call_soon_threadsafe(events.put_nowait, (idx, kind))
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        reqs = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                reqs.append(self.engine.submit(Request(ids, p, notify=lambda r, k, i=i: notify(r, k, i))))
        except QueueFull as e:
            for r in reqs:
                r.cancel()
            raise BadRequest(f"the server is busy: {e}; retry later", 503, "server_busy") from None
        return reqs, events

    async def wait(self, http: HTTPRequest, reqs, events) -> bool:
        """Until every request is done; False (requests cancelled) if the client went away."""
        while not all(r.done.is_set() for r in reqs):
            try:
                await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    for r in reqs:
                        r.cancel()
                    return False
        return True

    # ---- OpenAI completions
    def completion_params(self, body: CompletionRequest) -> SamplingParams:
        return SamplingParams(max_new_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p, seed=body.seed, stop=tuple(body.stop), logprobs=body.logprobs,
                              echo=body.echo and body.logprobs is not None)

    def cut(self, text: str, stops) -> str:
        for s in stops:
            text = text.split(s)[0]
        return text

    def logprobs_object(self, r: Request, echo: bool) -> dict:
        ids = (r.prompt if echo else []) + r.tokens
        lps = (r.prompt_logprobs if echo else []) + r.token_logprobs
        tops = (r.prompt_top_logprobs if echo else []) + r.top_logprobs
        strings = [self.token_text(i) for i in ids]
        offsets, pos = [], 0
        for s in strings:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": strings, "token_logprobs": lps, "text_offset": offsets,
                "top_logprobs": [None if t is None else {self.token_text(i): v for i, v in t.items()}
                                 for t in tops]}

    def full_text(self, r: Request, stops, new_tokens=None) -> str:
        """The prompt's text followed by the generation's (decoded together, so the seam is right)."""
        gen = r.tokens[:new_tokens] if new_tokens is not None else r.tokens
        prompt, whole = self.decode(r.prompt), self.decode(r.prompt + gen)
        tail = whole[len(prompt):] if whole.startswith(prompt) else self.decode(gen)
        return prompt + self.cut(tail, stops)

    def choice(self, index: int, r: Request, body: CompletionRequest) -> dict:
        text = self.full_text(r, body.stop) if body.echo else self.cut(self.decode(r.tokens), body.stop)
        return {"index": index, "text": text, "finish_reason": r.finish_reason,
                "logprobs": self.logprobs_object(r, body.echo) if body.logprobs is not None else None}

    def usage(self, reqs) -> dict:
        p, c = sum(len(r.prompt) for r in reqs), sum(len(r.tokens) for r in reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def failed(self, reqs) -> Optional[JSONResponse]:
        err = next((r.error for r in reqs if r.finish_reason == "error"), None)
        return error_response(f"generation failed: {one_line(err)}", 500, "server_error") if err else None


def build_app(server: Server) -> FastAPI:
    app = FastAPI(title="megatron-moe text generation")

    @app.exception_handler(BadRequest)
    async def _bad(_, e: BadRequest):
        return error_response(str(e), e.status, e.kind)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return error_response(one_line(f"internal error: {type(e).__name__}: {e}"), 500, "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, **server.engine.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "megatron-moe",
                                            "max_model_len": server.max_length}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"eos_token": server.eos_text, "bos_token": None, "pad_token": None,
                "model_max_length": server.max_length}

    @app.post("/tokenize")
    async def tokenize(http: HTTPRequest):
        prompt = (await read_object(http, server.read_timeout)).get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("'prompt': a string is required")
        ids = server.encode(prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.max_length}

    @app.post("/detokenize")
    async def detokenize(http: HTTPRequest):
        ids = (await read_object(http, server.read_timeout)).get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < server.vocab_size for i in ids):
            raise BadRequest("'tokens': a list of token ids in the vocabulary is required")
        return {"prompt": server.tok.detokenize([i for i in ids if i < server.tok.vocab_size])}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await read_json(http, CompletionRequest, server.read_timeout)
        prompts = body.prompts()
        if not prompts or len(prompts) > server.engine.max_waiting:
            raise BadRequest(f"'prompt': give 1 to {server.engine.max_waiting} prompts")
        ids = [server.prompt_ids(p, f"prompt {i}" if len(prompts) > 1 else "the prompt", body.max_tokens)
               for i, p in enumerate(prompts)]
        reqs, events = server.submit(ids, [server.completion_params(body) for _ in ids], stream=body.stream)
        head = {"id": f"cmpl-{reqs[0].id}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_name}
        if body.stream:
            return StreamingResponse(stream(http, body, reqs, events, head), media_type="text/event-stream")
        if not await server.wait(http, reqs, events):
            return error_response("the client disconnected", 499)
        return server.failed(reqs) or {**head, "choices": [server.choice(i, r, body) for i, r in enumerate(reqs)],
                                       "usage": server.usage(reqs)}

    async def stream(http, body, reqs, events, head):
        sent = ["" for _ in reqs]
        try:
            if body.echo:
                for i, r in enumerate(reqs):
                    yield _sse({**head, "choices": [{"index": i, "text": server.decode(r.prompt), "finish_reason": None,
                                                     "logprobs": None}]})
            while True:
                i, kind = await events.get()
                r = reqs[i]
                text = server.cut(server.decode(r.tokens), body.stop)
                delta, sent[i] = text[len(sent[i]):], text
                finish = r.finish_reason if kind == "done" else None
                if delta or finish:
                    yield _sse({**head, "choices": [{"index": i, "text": delta, "finish_reason": finish,
                                                     "logprobs": None}]})
                if all(r.done.is_set() for r in reqs) and events.empty():
                    break
            yield _sse({**head, "choices": [], "usage": server.usage(reqs)})
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the generator is closed)
            for r in reqs:
                r.cancel()

    @app.put("/api")
    async def megatron_api(http: HTTPRequest):
        body = await read_json(http, MegatronRequest, server.read_timeout)
        if body.tokens_to_generate == 0 and not body.logprobs:
            raise BadRequest("'tokens_to_generate' is 0: set 'logprobs' true to score the prompts, or ask for tokens")
        if len(body.prompts) > server.engine.max_waiting:
            raise BadRequest(f"'prompts': at most {server.engine.max_waiting} per request")
        bos = [server.tok.eod] if body.add_BOS else []
        ids = [server.prompt_ids(bos + server.encode(p) if bos else p, f"prompt {i}", body.tokens_to_generate)
               for i, p in enumerate(body.prompts)]
        params = SamplingParams(max_new_tokens=body.tokens_to_generate, temperature=body.temperature, top_k=body.top_k,
                                top_p=body.top_p if body.top_p > 0 else 1.0, seed=body.random_seed,
                                stop=tuple(body.stop), stop_token_ids=body.stop_tokens(),
                                logprobs=0 if body.logprobs else None, echo=body.logprobs)
        if body.tokens_to_generate == 0:  # scoring only: the prompt's log-probs from one forward
            params.max_new_tokens = 1
        reqs, events = server.submit(ids, [params] * len(ids))
        if not await server.wait(http, reqs, events):
            return error_response("the client disconnected", 499)
        if (bad := server.failed(reqs)) is not None:
            return bad
        n_new = body.tokens_to_generate
        out = {"text": [server.full_text(r, body.stop, n_new) for r in reqs],
               "tokens": [r.prompt + r.tokens[:n_new] for r in reqs]}
        if body.logprobs:
            out["logprobs"] = [r.prompt_logprobs[1:] + r.token_logprobs[:n_new] for r in reqs]
        return out

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
