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

COUNT_MAX = 2**31 - 1  # token counts, top_k, token ids: a bound far above any model's, below every overflow
TEMPERATURE_MAX = 100.0  # past ~10 every token is as likely as any other
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
STOP_MAX = 16  # stop strings per request


class _Strict(BaseModel):
    # strict: an int is a float, a string is neither; NaN and Infinity (which Python's json reads) are refused
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _seed(v):
    if v is not None and not SEED_MIN <= v <= SEED_MAX:
        raise ValueError(f"must be an integer from -2**63 to 2**64 - 1 (got one of {len(str(abs(v)))} digits)")
    return v


def _stops(v):
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > STOP_MAX or any(not s for s in stops):
        raise ValueError(f"at most {STOP_MAX} non-empty strings")
    return stops


class CompletionRequest(_Strict):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    model: Optional[StrictStr] = None
    max_tokens: int = Field(16, ge=1, le=COUNT_MAX)
    temperature: float = Field(1.0, ge=0, le=TEMPERATURE_MAX)  # 0 = greedy (so is anything below 1e-5)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=COUNT_MAX)  # 0 = off
    stop: Optional[Union[StrictStr, list[StrictStr]]] = Field(default=None, validate_default=True)
    seed: Optional[int] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: StrictBool = False
    stream: StrictBool = False
    n: int = Field(1, ge=1, le=1)  # one choice per prompt (send a prompt several times for more)

    _stop = field_validator("stop")(classmethod(lambda cls, v: _stops(v)))
    _seed = field_validator("seed")(classmethod(lambda cls, v: _seed(v)))

    def prompts(self) -> list:
        """A list of prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class MegatronRequest(_Strict):
    prompts: list[StrictStr] = Field(min_length=1)
    tokens_to_generate: int = Field(64, ge=0, le=COUNT_MAX)  # 0 only scores the prompts (with logprobs)
    temperature: float = Field(1.0, ge=0, le=TEMPERATURE_MAX)
    top_k: int = Field(0, ge=0, le=COUNT_MAX)
    top_p: float = Field(0.0, ge=0, le=1)  # 0 = off
    logprobs: StrictBool = False
    add_BOS: StrictBool = False
    random_seed: Optional[int] = None
    stop: list[StrictStr] = Field(default_factory=list)
    stop_token: Optional[Union[StrictInt, list[StrictInt]]] = None

    _stop = field_validator("stop")(classmethod(lambda cls, v: _stops(v)))
    _seed = field_validator("random_seed")(classmethod(lambda cls, v: _seed(v)))

    @field_validator("stop_token")
    @classmethod
    def _stop_token(cls, v):
        if any(not 0 <= t <= COUNT_MAX for t in ([v] if isinstance(v, int) else v or [])):
            raise ValueError("token ids from 0 to 2**31 - 1")
        return v

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
