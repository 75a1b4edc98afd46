"""Incremental detokenization: the text each new token adds, never half a UTF-8 character."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROMPT_WINDOW = 5


class IncrementalDetokenizer:
    """Decodes a growing token list through a sliding window, like TGI's `decode_token`."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-PROMPT_WINDOW:])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=False))

    def push(self, token: int) -> str:
        """Add a token; return the text it completes ("" while a character is still incomplete)."""
        self._ids.append(token)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            piece = full_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            if self._prefix > 64:
                self._ids = self._ids[self._prefix :]
                self._read -= self._prefix
                self._prefix = 0
            self.text += piece
            return piece
        return ""
