"""`/tokenize`'s byte offsets from character offsets."""

from __future__ import annotations

from llm_serving.tokens import simple_tokens


def test_byte_offsets_of_multibyte_text() -> None:
    text = "a東京😀b"
    ids = [1, 2, 3, 4, 5, 6]
    # "東" split over two tokens that both span it (as byte-level BPE reports), then back-to-back spans.
    offsets = [(0, 1), (1, 2), (1, 2), (2, 3), (3, 4), (4, 5)]
    tokens = simple_tokens(text, ids, offsets)
    assert [(t["start"], t["stop"]) for t in tokens] == [(0, 1), (1, 4), (1, 4), (4, 7), (7, 11), (11, 12)]
    assert [t["text"] for t in tokens] == ["a", "東", "東", "京", "😀", "b"]
    raw = text.encode()
    assert all(raw[t["start"] : t["stop"]].decode() == t["text"] for t in tokens)


def test_special_tokens_without_a_span() -> None:
    tokens = simple_tokens("hé", [0, 7, 8], [(0, 0), (0, 1), (1, 2)])
    assert [(t["id"], t["start"], t["stop"], t["text"]) for t in tokens] == [
        (0, 0, 0, ""),
        (7, 0, 1, "h"),
        (8, 1, 3, "é"),
    ]
