"""Real faults for the serving tests: a model whose forward raises when its input holds a trigger token.

Run as a script (the torchrun worker of the tensor-parallel fault tests) it is the server, with the fault
armed on rank `$FAULT_RANK` for token `$FAULT_TOKEN`: the forward raises, or with `$FAULT_KIND=hang` never
returns; the flags are the server's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

FAULT_RANK_ENV = "FAULT_RANK"
FAULT_TOKEN_ENV = "FAULT_TOKEN"
FAULT_KIND_ENV = "FAULT_KIND"


def raise_on_token(token: int, hang: bool = False) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
    """A forward pre-hook: an embedding lookup of `token` raises (or blocks for good), before any of the
    step's collectives."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        ids = args[0] if args else None
        if isinstance(module, torch.nn.Embedding) and isinstance(ids, torch.Tensor) and token in ids:
            if hang:
                threading.Event().wait()
            raise RuntimeError(f"injected fault: token {token}")

    return hook


def trigger_llama(token: int) -> type[LlamaForCausalLM]:
    """A Llama class whose every forward over `token` raises (for `thread_server(model_class=...)`)."""

    class TriggerLlama(LlamaForCausalLM):  # type: ignore[no-untyped-call]
        def __init__(self, config: LlamaConfig) -> None:
            super().__init__(config)
            self.get_input_embeddings().register_forward_pre_hook(raise_on_token(token))

    return TriggerLlama


def main() -> None:
    if os.environ.get("RANK") == os.environ.get(FAULT_RANK_ENV):
        hook = raise_on_token(int(os.environ[FAULT_TOKEN_ENV]), hang=os.environ.get(FAULT_KIND_ENV) == "hang")
        torch.nn.modules.module.register_module_forward_pre_hook(hook)
    from llm_serving.__main__ import main as serve

    serve()


if __name__ == "__main__":
    main()
