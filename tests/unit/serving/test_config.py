"""Server limits and KV cache flags: defaults, validation, and how the command line maps onto them."""

from __future__ import annotations

from typing import Any

import pytest

from llm_serving.__main__ import parse_args
from llm_serving.config import CacheOptions, Limits, check_capacity


def test_the_kv_capacity_is_computed_unless_given() -> None:
    assert Limits().max_batch_total_tokens is None
    assert Limits(max_batch_total_tokens=4096).max_batch_total_tokens == 4096


def test_a_capacity_below_one_full_request_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"max_total_tokens \(2048\) must be <= max_batch_total_tokens \(1000\)"
    ):
        Limits(max_batch_total_tokens=1000)
    limits = Limits(max_input_tokens=256, max_total_tokens=512)
    check_capacity(limits, 512)
    with pytest.raises(ValueError, match=r"cannot hold one request of maximal length"):
        check_capacity(limits, 496)


@pytest.mark.parametrize("options", [{"block_size": 0}, {"memory_fraction": 0.0}, {"memory_fraction": 1.5}])
def test_cache_options_are_checked(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"block_size|kv_cache_memory_fraction"):
        CacheOptions(**options)


def test_flags_set_the_cache_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFIX_CACHING", raising=False)
    default = parse_args(["--model", "org/model"])
    assert default.limits.max_batch_total_tokens is None
    assert default.cache == CacheOptions()
    options = parse_args(
        [
            "--model",
            "org/model",
            "--max-batch-total-tokens",
            "8192",
            "--block-size",
            "32",
            "--disable-prefix-caching",
            "--disable-chunked-prefill",
            "--kv-cache-memory-fraction",
            "0.5",
        ]
    )
    assert options.limits.max_batch_total_tokens == 8192
    assert options.cache == CacheOptions(
        block_size=32, prefix_caching=False, chunked_prefill=False, memory_fraction=0.5
    )


def test_prefix_caching_env_turns_it_off_as_tgi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFIX_CACHING", "0")
    assert parse_args(["--model", "org/model"]).cache.prefix_caching is False


def test_invalid_limits_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--model", "org/model", "--max-batch-total-tokens", "100"])
    assert "must be <= max_batch_total_tokens (100)" in capsys.readouterr().err
