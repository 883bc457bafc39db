"""Request bodies of the two generation APIs, validated field by field (types strict: "5" is not 5).

- ``CompletionRequest``: OpenAI's legacy ``POST /v1/completions`` (what lm-eval's local-completions sends).
- ``MegatronRequest``: Megatron-LM's ``PUT /api`` (prompts, tokens_to_generate, temperature, top_k, top_p,
  logprobs, add_BOS, random_seed; plus stop strings and stop token ids).

Checks that need the model (prompt length against the context, token ids against the vocabulary)
are made by the app after tokenization.
"""
from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # strict: an int is a float, a string is neither


class CompletionRequest(_Strict):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    model: Optional[StrictStr] = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 = off
    stop: Optional[Union[StrictStr, list[StrictStr]]] = Field(default=None, validate_default=True)
    seed: Optional[int] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: StrictBool = False
    stream: StrictBool = False
    n: int = Field(1, ge=1, le=1)  # one choice per prompt (send a prompt several times for more)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("at most 16 non-empty strings")
        return stops

    def prompts(self) -> list:
        """A list of prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class MegatronRequest(_Strict):
    prompts: list[StrictStr] = Field(min_length=1)
    tokens_to_generate: int = Field(64, ge=0)  # 0 only scores the prompts (with logprobs)
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(0.0, ge=0, le=1)  # 0 = off
    logprobs: StrictBool = False
    add_BOS: StrictBool = False
    random_seed: Optional[int] = None
    stop: list[StrictStr] = Field(default_factory=list, max_length=16)
    stop_token: Optional[Union[StrictInt, list[StrictInt]]] = None

    def stop_tokens(self) -> tuple:
        t = self.stop_token
        return () if t is None else (t,) if isinstance(t, int) else tuple(t)


def first_error(exc) -> str:
    """One line from a pydantic ValidationError: the field and what is wrong with it."""
    errors = exc.errors()
    err = errors[0]
    loc = err.get("loc", ())
    field = str(loc[0]) if loc else ""
    where = field + "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))
    if err.get("type") == "missing":
        return f"'{where}' is required"
    if field == "prompt":
        return ("'prompt': must be a string, a list of strings, a list of token ids or a list of lists of "
                "token ids")
    if sum(1 for e in errors if e.get("loc", ())[:1] == loc[:1]) > 1:  # every member of a union refused it
        return f"'{where}': wrong type ({type(err.get('input')).__name__})"
    return f"'{where}': {err.get('msg', 'invalid').removeprefix('Value error, ')}"
