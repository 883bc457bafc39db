"""Our checkpoints as an lm-eval 0.4 model, registered as ``megatron-moe``.

loglikelihood: requests sorted by length (longest first), batched by micro-batch size, padded
on the right only to the batch's longest sequence; padding is masked out of MoE routing and
capacity (``token_mask``), and causal attention keeps it out of every real token. No token is
dropped unless ``moe_eval_capacity_factor`` is given. generate_until: greedy with a KV cache and
stop strings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from megatron.errors import UserError
from megatron.inference.generate import generate, generate_greedy_batch
from megatron.inference.load import load_model


def _bool_arg(name: str, value):
    """An lm-eval model argument that is a switch: None / "" / "None" (unset), a bool, or "true" / "false" (any
    case, also 1 / 0) as ``--model_args`` gives it; anything else is one line naming it."""
    if value in (None, "", "None") or isinstance(value, bool):
        return None if value in ("", "None") else value
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise UserError(f"--model_args {name}={value}: not a switch; give {name}=True or {name}=False (or leave it out "
                     f"for the tokenizer's default)")


@register_model("megatron-moe")
class MegatronMoELM(TemplateLM):
    def __init__(self, load: str = None, micro_batch_size: int = 8, moe_eval_capacity_factor=None, device=None,
                 max_length: int = None, vocab_file=None, merge_file=None, tokenizer_model=None, loaded=None, dtype=None,
                 add_bos_token=None, **kwargs):
        super().__init__()
        # lm-eval's hf model's option: None = the tokenizer's own default (a Llama / Mistral tokenizer adds BOS)
        self.add_bos_token = _bool_arg("add_bos_token", add_bos_token)
        cf = None if moe_eval_capacity_factor in (None, "", "None") else float(moe_eval_capacity_factor)
        self.lm = loaded or load_model(load, device, cf, dtype, vocab_file, merge_file, tokenizer_model)
        self.model, self.tokenizer_ = self.lm.model, self.lm.tokenizer
        self._device = next(self.model.parameters()).device
        self.batch_size = int(micro_batch_size)
        self.max_length = int(max_length or self.lm.cfg.max_position_embeddings)
        self.vocab_size = self.lm.cfg.vocab_size

    # ---- tokenization
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eod

    @property
    def prefix_token_id(self) -> int:
        """The empty context's token, as lm-eval's hf model: the declared BOS, else the end of document."""
        bos = getattr(self.tokenizer_, "bos", None)
        return self.eot_token_id if bos is None else bos

    def _prefix_text(self) -> str:
        """The prefix token's text as transformers decodes it ("<s>"; SentencePiece's own decode gives "")."""
        tok, i = self.tokenizer_, self.prefix_token_id
        return tok.special_text(i) if hasattr(tok, "special_text") else tok.detokenize([i])

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        """As lm-eval's hf model encodes: with the tokenizer's special tokens (BOS) unless told otherwise
        (``add_special_tokens``, else ``add_bos_token``), and without them when the text already starts with the
        prefix token's text ("<s>..."); tokenizers that add none (GPT-2 BPE, Null) just tokenize."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        prefix = self._prefix_text() if add_special_tokens is None else ""
        if prefix and string.startswith(prefix):
            return self.tokenizer_.tokenize(string)
        if special is not False and hasattr(self.tokenizer_, "encode_special"):
            return self.tokenizer_.encode_special(string)
        return self.tokenizer_.tokenize(string)

    def tok_decode(self, tokens) -> str:
        """Text of ``tokens``; ids of the padded vocabulary (>= the tokenizer's size: an undertrained
        model may pick them, they have logits but no text) are skipped, as the server does."""
        return self.tokenizer_.detokenize([int(t) for t in tokens if 0 <= int(t) < self.tokenizer_.vocab_size])

    # ---- scoring
    @torch.no_grad()
    def score_batch(self, seqs: list[list[int]]) -> torch.Tensor:
        """Right-padded forward of token lists -> log-probs [B, T_max, V] (fp32); padding masked out of routing."""
        T = max(len(s) for s in seqs)
        tokens = torch.zeros(len(seqs), T, dtype=torch.long, device=self._device)
        mask = torch.zeros(len(seqs), T, dtype=torch.bool, device=self._device)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = True
        logits = self.model.logits(tokens, token_mask=mask).logits  # [B, T, V]
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # each request: ((context, continuation), context_enc, continuation_enc)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list = [None] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            idx = order[start: start + self.batch_size]
            seqs, conts = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                whole = (ctx + cont)[-(self.max_length + 1):]  # truncate on the left
                seqs.append(whole[:-1])
                conts.append(cont)
            logp = self.score_batch(seqs)  # [B, T, V]
            for b, i in enumerate(idx):
                # a continuation longer than the window is scored on its last L tokens (those the model sees)
                L = len(seqs[b])
                n = min(len(conts[b]), L)
                lp = logp[b, L - n: L]  # [n, V] predictions of the continuation tokens
                target = torch.tensor(conts[b][-n:], device=self._device)
                results[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="loglikelihood_rolling"):
            windows = [(None,) + lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            out.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy requests run in length-sorted, left-padded batches of ``micro_batch_size``; sampled ones alone."""
        args = [r.args for r in requests]
        out: list = [None] * len(args)
        groups: dict = {}
        for i, (context, gen_kwargs) in enumerate(args):
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = int(kw.get("max_gen_toks", 256))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            keep = self.max_length - max_new
            prompt = (self.tok_encode(context)[-keep:] if keep > 0 else []) or [self.eot_token_id]
            groups.setdefault((until, max_new, temperature), []).append((i, prompt))
        bar = tqdm(total=len(args), disable=disable_tqdm, desc="generate_until")
        for (until, max_new, temperature), items in groups.items():
            stop = (lambda ids: any(s in self.tok_decode(ids) for s in until)) if until else None
            items.sort(key=lambda it: -len(it[1]))
            step = self.batch_size if temperature == 0 else 1
            for start in range(0, len(items), step):
                chunk = items[start: start + step]
                if temperature == 0:
                    ids = generate_greedy_batch(self.model, [p for _, p in chunk], max_new, eod=self.eot_token_id,
                                                stop=stop, max_length=self.max_length)
                else:
                    ids = [generate(self.model, chunk[0][1], max_new, temperature=temperature, eod=self.eot_token_id,
                                    stop=stop, max_length=self.max_length)]
                for (i, _), row in zip(chunk, ids):
                    text = self.tok_decode([t for t in row if t != self.eot_token_id])
                    for s_ in until:
                        text = text.split(s_)[0]
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out
