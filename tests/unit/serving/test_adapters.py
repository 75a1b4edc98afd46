"""Which LoRA adapter a flag, a TGI `adapter_id` or an OpenAI `model` names. No torch."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_contract import adapter_token_env
from llm_serving.adapters import (
    AdapterSource,
    adapter_folder,
    check_tensor_parallel,
    openai_adapter,
    parse_adapters,
    tgi_adapter,
)
from llm_serving.errors import ModelNotFoundError, ValidationError
from llm_serving.progress import Progress


def test_flags_parse_in_order_with_each_adapters_token() -> None:
    env = {adapter_token_env("sql-expert"): "hf_secret"}
    got = parse_adapters(["sql-expert=org/sql@abc123", "local=/data/lora"], env)
    assert got == (
        AdapterSource("sql-expert", "org/sql", "abc123", "hf_secret"),
        AdapterSource("local", "/data/lora", None, None),
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["a=x", "a=y"], "given twice"),
        (["tgi=x"], "reserved for the base model"),
        (["=x"], "NAME=SOURCE"),
        (["a"], "NAME=SOURCE"),
    ],
)
def test_bad_flags_are_refused(values: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_adapters(values, {})


def test_tensor_parallel_with_adapters_is_refused_naming_them() -> None:
    check_tensor_parallel(4, ())
    check_tensor_parallel(1, (AdapterSource("a", "x"),))
    with pytest.raises(ValueError, match=r"LoRA adapters \(a, b\) are not supported with tensor parallelism"):
        check_tensor_parallel(2, (AdapterSource("a", "x"), AdapterSource("b", "y")))


def test_tgi_adapter_id() -> None:
    assert tgi_adapter(None, ("a",)) is None
    assert tgi_adapter("", ("a",)) is None
    assert tgi_adapter("a", ("a",)) == "a"
    with pytest.raises(ValidationError, match=r"'b' is not a loaded LoRA adapter \(loaded: a\)"):
        tgi_adapter("b", ("a",))
    with pytest.raises(ValidationError, match=r"\(loaded: none\)"):
        tgi_adapter("b", ())


def test_openai_model() -> None:
    for base in (None, "tgi", "base-id"):
        assert openai_adapter(base, "base-id", ("a",)) is None
    assert openai_adapter("a", "base-id", ("a",)) == "a"
    assert openai_adapter("anything", "base-id", ()) is None  # no adapters: any model is the base (TGI)
    with pytest.raises(ModelNotFoundError) as info:
        openai_adapter("b", "base-id", ("a",))
    assert info.value.status == 404
    assert info.value.body() == {
        "error": {
            "message": "The model `b` does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_an_adapter_folder_is_local_or_fetched_from_the_hub(tmp_path: Path) -> None:
    asked: list[tuple[str, str | None, str | None]] = []  # a stand-in for the Hub download (no Hub here)

    def fetch(repo: str, revision: str | None, token: str | None, progress: Progress) -> Path:
        asked.append((repo, revision, token))
        return tmp_path / "snapshot"

    assert adapter_folder(AdapterSource("a", str(tmp_path)), fetch) == tmp_path
    assert asked == []
    hub = AdapterSource("b", "org/lora", "abc", "hf_x")
    assert adapter_folder(hub, fetch) == tmp_path / "snapshot"
    assert asked == [("org/lora", "abc", "hf_x")]
