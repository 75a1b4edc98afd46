"""Per-request sampling and stopping parameters, already validated."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

GrammarKind = Literal["json_schema", "regex", "json_object", "lark"]


class FrequencyRule(Enum):
    """What `frequency_penalty` subtracts from a token's logit; the API a request came through decides.

    TGI: `penalty * count / length`, counted over the prompt and the output, `length` their total (TGI's
    `HeterogeneousFrequencyPenaltyLogitsProcessor`, for a row on its own). OpenAI: `penalty * count`,
    counted over the output only.
    """

    TGI = "tgi"
    OPENAI = "openai"


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on a request's output: `value` is the JSON text of a JSON Schema (`json_schema`), a
    regular expression (`regex`, matched against the whole output), a Lark grammar (`lark`), or empty
    (`json_object`: any JSON object). Compiled by `llm_serving.sampling.grammar`."""

    kind: GrammarKind
    value: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen for one request (TGI semantics: any warper implies sampling)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    frequency_rule: FrequencyRule = FrequencyRule.TGI
    watermark: bool = False
    seed: int | None = None
    top_n_tokens: int = 0
    grammar: GrammarSpec | None = None

    @property
    def warps(self) -> bool:
        """Whether a sampling warper (temperature, top-k/p, typical-p) differs from its neutral value."""
        return self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0 or self.typical_p < 1.0


@dataclass(frozen=True)
class StoppingParams:
    """When a request stops: token budget, stop strings, EOS."""

    max_new_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
