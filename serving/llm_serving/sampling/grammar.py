"""Structured output: `GrammarSpec`s compiled by llguidance, one compiler (and LLTokenizer) per tokenizer.

How to use it:

- A request asks for structured output with `SamplingParams.grammar = GrammarSpec(kind, value)`:
  `GrammarSpec("json_schema", json.dumps(schema))`, `GrammarSpec("regex", pattern)`,
  `GrammarSpec("json_object")` (any JSON object) or `GrammarSpec("lark", grammar)`. The TGI `grammar` and
  OpenAI `response_format` fields become one in `llm_serving.validation.grammar_spec`.
- Validation compiles it off the event loop: `GenerationService.validate` calls
  `grammars_for(tokenizer).compile(spec)`, which raises `ValidationError` (422, TGI's shape) naming what is
  wrong and caches the compiled grammar; a spec set on the sampling params after validation is compiled by the
  engine when the request is added (a bad one then fails the request with a generation error).
- The engine keeps one matcher per constrained request (`llm_serving.sampling.masks.Constraints`): each step
  it fills the allowed-token bitmask of the constrained rows about to sample, the sampler sends every other
  token of those rows to -inf, the chosen token advances the matcher, and a matcher that can only stop ends
  the request (`eos_token`). Free rows in the same batch are untouched.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import llguidance

from llm_serving.errors import ValidationError
from llm_serving.sampling.params import GrammarSpec

if TYPE_CHECKING:  # a TypedDict of llguidance's stubs only
    from llguidance._lib import JsonCompileOptions

CACHE_SIZE = 256
"""Compiled grammars kept per tokenizer (least recently used evicted)."""
MAX_GRAMMAR_CHARS = 64 * 1024
"""The longest schema (as JSON text), regex or Lark grammar accepted."""
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
"""JSON is written on one line, `{"a": 1, "b": [2, 3]}` (a schema's `x-guidance` may override it): a model
cannot spend its token budget on whitespace."""
ANY_OBJECT = '{"type": "object"}'


class GrammarError(ValidationError):
    """A grammar that cannot be compiled: TGI's "grammar is not valid" 422."""

    prefix = f"{ValidationError.prefix}grammar is not valid: "


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar for `spec` (not yet checked against the tokenizer). Pure."""
    if len(spec.value) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the {spec.kind} is longer than {MAX_GRAMMAR_CHARS} characters")
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(spec.value)
    schema = ANY_OBJECT if spec.kind == "json_object" else spec.value
    try:
        parsed = json.loads(schema)
    except ValueError as exc:
        raise GrammarError(f"the JSON schema is not JSON: {exc}") from None
    if not isinstance(parsed, dict | bool):
        raise GrammarError("a JSON schema must be an object or a boolean")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise GrammarError(str(exc)) from None


class Grammars:
    """Compiled grammars for one tokenizer: each a matcher in its initial state, copied for every request.

    Thread-safe: validation workers compile, the engine thread takes copies."""

    def __init__(self, tokenizer: Any, cache_size: int = CACHE_SIZE) -> None:
        self._tokenizer = tokenizer
        self._cache_size = cache_size
        self._ll: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the tokenizer (built on first use: ~0.3 s for a 50k vocabulary)."""
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                try:
                    self._ll = llguidance.hf.from_tokenizer(self._tokenizer)
                except ValueError as exc:
                    raise GrammarError(f"structured output needs a fast tokenizer ({exc})") from None
            return self._ll

    @property
    def vocab_size(self) -> int:
        return int(self.ll_tokenizer.vocab_size)

    def _cached(self, spec: GrammarSpec) -> llguidance.LLMatcher | None:
        with self._lock:
            template = self._cache.get(spec)
            if template is not None:
                self._cache.move_to_end(spec)
            return template

    def _build(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """Compile `spec`, check it yields a first mask, and cache it; GrammarError when it does not."""
        template = llguidance.LLMatcher(self.ll_tokenizer, grammar_text(spec), log_level=0)
        if not template.is_error():
            template.compute_bitmask()  # lexer errors and limits show on the first mask
        if template.is_error():
            raise GrammarError(template.get_error().strip())
        with self._lock:
            self._cache[spec] = template
            self._cache.move_to_end(spec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return template

    def compile(self, spec: GrammarSpec) -> float | None:
        """Make sure `spec` is compiled; the seconds it took when it was not cached (None on a hit)."""
        if self._cached(spec) is not None:
            return None
        start = time.perf_counter()
        self._build(spec)
        return time.perf_counter() - start

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher for one request (compiled now on a cache miss)."""
        template = self._cached(spec) or self._build(spec)
        with self._lock:
            return template.deep_copy()

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)


_by_tokenizer: WeakKeyDictionary[Any, Grammars] = WeakKeyDictionary()
_by_tokenizer_lock = threading.Lock()


def grammars_for(tokenizer: Any) -> Grammars:
    """The one `Grammars` of `tokenizer` (shared by validation and the engine)."""
    with _by_tokenizer_lock:
        grammars = _by_tokenizer.get(tokenizer)
        if grammars is None:
            grammars = _by_tokenizer[tokenizer] = Grammars(tokenizer)
        return grammars
