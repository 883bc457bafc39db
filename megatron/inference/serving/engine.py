"""Continuous batching: requests join and leave one batched KV cache between decode steps.

Each step (on the engine's own thread): rows whose client went away are freed; waiting requests
are admitted up to ``max_batch_size`` rows and prefilled together (left-padded, padding masked out
of attention and MoE routing) into the running cache; then one decode step runs over every row.
A row that finishes (end of document, a stop token or string, its token budget, the context) is
freed at once. Greedy and sampled rows share a batch; each request samples with its own
torch.Generator seeded from its ``seed``, so its tokens do not depend on what else is running.

Failures are per request: an exception while handling one row (sampling, log-probs, stop checks) ends that
request alone with ``finish_reason`` "error"; a prefill forward that fails is retried one request at a time,
so only the request that cannot be prefilled fails. Only a failed decode forward (one call over every row,
its cache possibly half-written) ends every running request.
"""
from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron.inference.generate import sample_token
from megatron.inference.serving.batch import BatchState


class QueueFull(Exception):
    """More requests are waiting than the engine accepts (``max_waiting``)."""


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: Optional[int] = None
    stop: tuple = ()  # strings that end the generation (not part of the text)
    stop_token_ids: tuple = ()  # token ids that end the generation (kept in the tokens)
    logprobs: Optional[int] = None  # None: none; k >= 0: each token's log-prob and the top k
    echo: bool = False  # also the prompt's log-probs (scoring)


_ids = itertools.count()


@dataclass
class Request:
    prompt: list
    params: SamplingParams
    notify: Optional[Callable[["Request", str], None]] = None  # (request, "token" | "done"), on the engine thread
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)  # per token: {token id: log-prob}
    prompt_logprobs: list = field(default_factory=list)  # [None, lp(prompt[1]), ...] when echo
    prompt_top_logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled" | "error"
    error: Optional[str] = None
    cancelled: bool = False

    def __post_init__(self):
        seed = self.params.seed if self.params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator().manual_seed(seed)
        self.done = threading.Event()

    def cancel(self) -> None:
        """The client went away: the engine frees the row at its next step."""
        self.cancelled = True


def _logprob_entries(logp: torch.Tensor, token: int, k: int):
    """logp [V] -> (log-prob of ``token``, {id: log-prob} of the top k)."""
    top = {}
    if k > 0:
        values, ids = torch.topk(logp, k)
        top = {int(i): float(v) for i, v in zip(ids, values)}
    return float(logp[token]), top


class Engine:
    def __init__(self, model, eod: int, max_length: int, detokenize: Callable[[list], str], max_batch_size: int = 16,
                 max_waiting: int = 64, state: Optional[BatchState] = None):
        self.eod, self.max_length, self.detokenize = eod, max_length, detokenize
        self.max_batch_size, self.max_waiting = max_batch_size, max_waiting
        self.state = state or BatchState(model)
        self.device = self.state.device
        self.waiting: collections.deque = collections.deque()
        self.running: list[Request] = []  # row i of the cache is running[i]
        self._cv = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0
        self.cancelled = 0  # requests whose client went away

    # ---- submission (any thread)
    def submit(self, req: Request) -> Request:
        with self._cv:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-waiting-requests)")
            self.waiting.append(req)
            self._cv.notify()
        return req

    def load(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "cancelled": self.cancelled}

    # ---- the loop
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 60.0) -> None:
        """Finish what is running and waiting, then stop the loop."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    IDLE_PING_S = 60.0  # an idle engine calls state.idle() this often (expert-parallel ranks wait on rank 0)

    def _run(self) -> None:
        idle = getattr(self.state, "idle", None)
        while True:
            with self._cv:
                while not self.waiting and not self.running and not self._stop:
                    if not self._cv.wait(self.IDLE_PING_S) and idle is not None:
                        idle()
                if self._stop and not self.waiting and not self.running:
                    break
            self.step()
        stop = getattr(self.state, "stop", None)
        if stop is not None:
            stop()

    def step(self) -> None:
        """Free cancelled rows, admit and prefill waiting requests, decode one token for every row."""
        admitted: list[Request] = []
        try:
            self._free([r for r in self.running if r.cancelled], "cancelled")
            with self._cv:
                while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
                    r = self.waiting.popleft()
                    if r.cancelled:
                        self._finish(r, "cancelled")
                    else:
                        admitted.append(r)
            if admitted:
                self._admit(admitted)
            if self.running:
                self._decode()
            self.steps += 1
        except Exception as e:  # a failed decode forward fails the running rows, never the server
            self._fail_all(self.running + [r for r in admitted if r not in self.running and not r.done.is_set()], e)

    def _fail_all(self, reqs: list[Request], e: Exception) -> None:
        self.running = []
        try:
            self.state.keep([])
        except Exception:  # the cache is dropped either way
            self.state.cache = None
        for r in reqs:
            self._error(r, e)

    def _error(self, r: Request, e: Exception) -> None:
        r.error = " ".join(f"{type(e).__name__}: {e}".split())[:500]  # one line
        self._finish(r, "error")

    def _admit(self, reqs: list[Request]) -> None:
        """Prefill ``reqs`` together; if that forward fails, one at a time, so only a request that cannot be
        prefilled fails (a failed prefill leaves the running rows' cache as it was)."""
        rows = len(self.running)
        try:
            self._prefill(reqs)
            return
        except Exception as e:
            if len(self.running) != rows or self.state.rows != rows:
                raise  # failed after joining the cache: not recoverable row by row
            if len(reqs) == 1:
                self._error(reqs[0], e)
                return
        for r in reqs:
            try:
                self._prefill([r])
            except Exception as e:
                if len(self.running) != rows or self.state.rows != rows:
                    raise
                self._error(r, e)
            rows = len(self.running)

    # ---- internals (engine thread)
    def _prefill(self, reqs: list[Request]) -> None:
        T = max(len(r.prompt) for r in reqs)
        tokens = torch.zeros(len(reqs), T, dtype=torch.long, device=self.device)
        valid = torch.zeros(len(reqs), T, dtype=torch.bool, device=self.device)
        for i, r in enumerate(reqs):
            tokens[i, T - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
            valid[i, T - len(r.prompt):] = True
        echo = any(r.params.echo for r in reqs)
        logits = self.state.prefill(tokens, valid, all_logits=echo)  # [B', T, V] with echo, else [B', 1, V]
        self.running += reqs
        failed = []
        for i, r in enumerate(reqs):
            if r.params.echo:
                try:
                    n, k = len(r.prompt), r.params.logprobs or 0
                    logp = torch.log_softmax(logits[i, T - n: T - 1].float(), dim=-1)  # [n-1, V] predicting prompt[1:]
                    entries = [_logprob_entries(logp[j], r.prompt[j + 1], k) for j in range(n - 1)]
                    r.prompt_logprobs = [None] + [e[0] for e in entries]
                    r.prompt_top_logprobs = [None] + [e[1] for e in entries]
                except Exception as e:  # this request alone fails
                    failed.append((r, e))
        self._sample(logits[:, -1], first_row=len(self.running) - len(reqs), failed=failed)

    def _decode(self) -> None:
        tokens = torch.tensor([r.tokens[-1] for r in self.running], dtype=torch.long, device=self.device)
        positions = torch.tensor([len(r.prompt) + len(r.tokens) - 1 for r in self.running], dtype=torch.long,
                                 device=self.device)
        self._sample(self.state.decode(tokens, positions), first_row=0)

    def _sample(self, logits: torch.Tensor, first_row: int, failed: Optional[list] = None) -> None:
        """logits [b, V] for rows first_row.. of the batch: one token each; finished rows are freed. A row whose
        handling raises (or that is in ``failed``: (request, exception)) ends with "error"; the others go on."""
        failed = list(failed or [])
        skip = {id(r) for r, _ in failed}
        finished = []
        for j in range(logits.shape[0]):
            r = self.running[first_row + j]
            if id(r) in skip:
                continue
            try:
                reason = self._sample_row(r, logits[j])
            except Exception as e:  # this request alone fails
                failed.append((r, e))
                continue
            if reason:
                finished.append((r, reason))
            elif r.notify:
                self._notify(r, "token")
        for r, reason in finished:
            self._free([r], reason)
        if failed:
            gone = {id(r) for r, _ in failed}
            keep = [i for i, r in enumerate(self.running) if id(r) not in gone]
            self.state.keep(keep)
            self.running = [self.running[i] for i in keep]
            for r, e in failed:
                self._error(r, e)

    def _sample_row(self, r: Request, logits: torch.Tensor) -> Optional[str]:
        """One token for ``r`` from its logits [V]; its finish reason, or None."""
        p = r.params
        row = logits.float()
        token = sample_token(row, p.temperature, p.top_k, p.top_p if p.top_p < 1.0 else 0.0, r.generator)
        r.tokens.append(token)
        if p.logprobs is not None:
            lp, top = _logprob_entries(torch.log_softmax(row, dim=-1), token, p.logprobs)
            r.token_logprobs.append(lp)
            r.top_logprobs.append(top)
        return self._finish_reason(r, token)

    def _finish_reason(self, r: Request, token: int) -> Optional[str]:
        if token == self.eod or token in r.params.stop_token_ids:
            return "stop"
        if r.params.stop and any(s in self.detokenize(r.tokens) for s in r.params.stop):
            return "stop"
        if len(r.tokens) >= r.params.max_new_tokens or len(r.prompt) + len(r.tokens) >= self.max_length:
            return "length"
        return None

    def _free(self, reqs: list[Request], reason: str) -> None:
        if not reqs:
            return
        gone = {id(r) for r in reqs}
        keep = [i for i, r in enumerate(self.running) if id(r) not in gone]
        self.state.keep(keep)
        self.running = [self.running[i] for i in keep]
        for r in reqs:
            self._finish(r, reason)

    def _finish(self, r: Request, reason: str) -> None:
        self.cancelled += reason == "cancelled"
        r.finish_reason = reason
        r.done.set()
        if r.notify:
            self._notify(r, "done")

    @staticmethod
    def _notify(r: Request, kind: str) -> None:
        try:
            r.notify(r, kind)
        except Exception:  # a broken callback must not fail the batch; the request's done event is set regardless
            pass
