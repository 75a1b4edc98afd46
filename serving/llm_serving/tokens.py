"""`/tokenize` answers: the tokenizer's character offsets as TGI's byte offsets, in one pass. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from llm_serving.protocol.tgi import SimpleToken


class _ByteOffsets:
    """UTF-8 byte offset of character positions of `text`, moving a cursor: linear over monotone queries."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._char = 0
        self._byte = 0

    def at(self, char: int) -> int:
        if char >= self._char:
            self._byte += len(self._text[self._char : char].encode())
        else:
            self._byte -= len(self._text[char : self._char].encode())
        self._char = char
        return self._byte


def simple_tokens(text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]]) -> list[SimpleToken]:
    """TGI's `SimpleToken`s: each token's text and its byte span in `text` (as the Rust tokenizer reports)."""
    position = _ByteOffsets(text)
    tokens: list[SimpleToken] = []
    for token_id, (start, stop) in zip(ids, offsets, strict=True):
        byte_start = position.at(start)
        byte_stop = position.at(stop)
        tokens.append({"id": int(token_id), "text": text[start:stop], "start": byte_start, "stop": byte_stop})
    return tokens
