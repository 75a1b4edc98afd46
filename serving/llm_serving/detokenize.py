"""Incremental detokenization: the text each new token adds, never half a UTF-8 character."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from tokenizers.decoders import ByteLevel

PROMPT_WINDOW = 5
# A UTF-8 character has at most 4 bytes and a token at least one: a text that still ends in U+FFFD after
# this many held tokens ends in a real U+FFFD (used only where the tokens' bytes are unknown).
MAX_HELD = 4

TokenBytes = Callable[[int], bytes]


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's), character -> byte: printable Latin-1 bytes stand for
    themselves, the other bytes for U+0100 onwards, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(0x100 + n): b for n, b in enumerate(others)})
    return table


def token_bytes(tokenizer: Any) -> TokenBytes | None:
    """How to get a token's bytes, for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM...);
    None for other tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(getattr(backend, "decoder", None), ByteLevel):
        return None
    alphabet = _byte_level_alphabet()
    added = getattr(tokenizer, "added_tokens_decoder", {})

    def of(token: int) -> bytes:
        piece = str(tokenizer.convert_ids_to_tokens(token))
        if token in added or any(c not in alphabet for c in piece):
            return piece.encode()
        return bytes(alphabet[c] for c in piece)

    return of


def ends_incomplete(data: bytes) -> bool:
    """Whether `data` ends inside a UTF-8 character that more bytes could still complete."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(data, final=False)
    return bool(decoder.getstate()[0])


class IncrementalDetokenizer:
    """Decodes a growing token list through a sliding window, like TGI's `decode_token`.

    TGI holds text back while it ends in U+FFFD, which stalls forever on a real U+FFFD. Here text is held
    only while the held tokens' bytes end inside a character; where the bytes are unknown, for at most
    `MAX_HELD` tokens.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._bytes = token_bytes(tokenizer)
        self._ids = list(prompt_ids[-PROMPT_WINDOW:])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=False))

    def _incomplete(self, text: str) -> bool:
        """Whether the held tokens (those after the read offset) end inside a character."""
        held = self._ids[self._read :]
        if self._bytes is not None:
            return ends_incomplete(b"".join(self._bytes(t) for t in held))
        return text.endswith("\ufffd") and len(held) < MAX_HELD

    def push(self, token: int) -> str:
        """Add a token; return the text it completes ("" while a character is still incomplete)."""
        self._ids.append(token)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not self._incomplete(full_text):
            piece = full_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            if self._prefix > 64:
                self._ids = self._ids[self._prefix :]
                self._read -= self._prefix
                self._prefix = 0
            self.text += piece
            return piece
        return ""
