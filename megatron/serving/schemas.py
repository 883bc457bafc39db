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

StrictFloat = Union[StrictInt, float]  # an int is a valid float; a string is not


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @field_validator("temperature", check_fields=False)
    @classmethod
    def _temperature(cls, v):
        if v < 0:
            raise ValueError("must be >= 0 (0 = greedy)")
        return float(v)

    @field_validator("top_k", check_fields=False)
    @classmethod
    def _top_k(cls, v):
        if v < 0:
            raise ValueError("must be >= 0 (0 = off)")
        return v


class CompletionRequest(_Strict):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    model: Optional[StrictStr] = None
    max_tokens: StrictInt = 16
    temperature: StrictFloat = 1.0
    top_p: StrictFloat = 1.0
    top_k: StrictInt = 0
    stop: Optional[Union[StrictStr, list[StrictStr]]] = Field(default=None, validate_default=True)
    seed: Optional[StrictInt] = None
    logprobs: Optional[StrictInt] = None
    echo: StrictBool = False
    stream: StrictBool = False
    n: StrictInt = 1

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1]")
        return float(v)

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v is not None and not 0 <= v <= 20:
            raise ValueError("must be between 0 and 20")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v != 1:
            raise ValueError("only n = 1 is served (send the prompt several times with different seeds)")
        return v

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
    tokens_to_generate: StrictInt = 64
    temperature: StrictFloat = 1.0
    top_k: StrictInt = 0
    top_p: StrictFloat = 0.0
    logprobs: StrictBool = False
    add_BOS: StrictBool = False
    random_seed: Optional[StrictInt] = None
    stop: list[StrictStr] = Field(default_factory=list, max_length=16)
    stop_token: Optional[Union[StrictInt, list[StrictInt]]] = None

    @field_validator("tokens_to_generate")
    @classmethod
    def _tokens(cls, v):
        if v < 0:
            raise ValueError("must be >= 0 (0 only scores the prompts, with logprobs true)")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be in [0, 1] (0 = off)")
        return float(v)

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
