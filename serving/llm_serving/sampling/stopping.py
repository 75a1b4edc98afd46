"""Stopping criteria, TGI order: length, then EOS, then stop sequences. Pure."""

from __future__ import annotations

from collections.abc import Collection

from llm_serving.engine.request import FinishReason
from llm_serving.sampling.params import StoppingParams


def check_stop(
    token: int,
    generated: int,
    text: str,
    new_text: str,
    params: StoppingParams,
    eos_ids: Collection[int],
) -> FinishReason | None:
    """Why generation stops after `token`, the `generated`-th, whose `new_text` ends `text` (None: go on)."""
    if generated >= params.max_new_tokens:
        return FinishReason.LENGTH
    if not params.ignore_eos and token in eos_ids:
        return FinishReason.EOS_TOKEN
    for stop in params.stop:
        # A stop string can only complete inside the newest text and the len(stop) - 1 characters before it.
        if stop and stop in text[-(len(stop) + len(new_text)) :]:
            return FinishReason.STOP_SEQUENCE
    return None
