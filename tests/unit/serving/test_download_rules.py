"""Which files a fetch takes, and which load failure each Hub error becomes (the errors are the ones
huggingface_hub's own `hf_raise_for_status` raises for the Hub's responses)."""

from __future__ import annotations

import errno

import httpx2
import pytest
from huggingface_hub import hf_raise_for_status
from huggingface_hub.errors import HfHubHTTPError

from llm_serving.download import load_error, select_files

ENDPOINT = "https://hub.example"
CONFIGS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "merges.txt",
    "chat_template.jinja",
]
OTHERS = [
    "README.md",
    ".gitattributes",
    "original/consolidated.00.pth",
    "onnx/model.onnx",
    "flax_model.msgpack",
]


def test_safetensors_are_the_only_weights_taken_when_a_repo_has_them() -> None:
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    legacy = ["pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "model.gguf"]
    names = CONFIGS + OTHERS + shards + ["model.safetensors.index.json", *legacy]
    assert select_files(names) == sorted([*CONFIGS, *shards, "model.safetensors.index.json"])


def test_gguf_is_taken_only_without_safetensors() -> None:
    assert select_files([*CONFIGS, *OTHERS, "model.Q4_1.gguf", "pytorch_model.bin"]) == sorted(
        [*CONFIGS, "model.Q4_1.gguf"]
    )


def test_pytorch_bins_are_the_last_resort() -> None:
    names = [*CONFIGS, *OTHERS, "pytorch_model.bin", "pytorch_model.bin.index.json"]
    assert select_files(names) == sorted([*CONFIGS, "pytorch_model.bin", "pytorch_model.bin.index.json"])


def test_a_repo_without_weights_gives_only_its_configs() -> None:
    assert select_files(CONFIGS + OTHERS) == sorted(CONFIGS)


def _hub_error(status: int, code: str | None, message: str) -> HfHubHTTPError:
    headers = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {})
    response = httpx2.Response(
        status,
        headers=headers,
        json={"error": message},
        request=httpx2.Request("GET", f"{ENDPOINT}/api/models/org/m/revision/main"),
    )
    with pytest.raises(HfHubHTTPError) as raised:
        hf_raise_for_status(response)
    return raised.value


@pytest.mark.parametrize(
    ("status", "code", "hub_message", "reason", "fix"),
    [
        (
            401,
            "GatedRepo",
            "Access to model org/m is restricted.",
            "ModelAccessDenied",
            "spec.model.tokenSecretRef",
        ),
        (
            403,
            "GatedRepo",
            "you are not in the authorized list",
            "ModelAccessDenied",
            "spec.model.tokenSecretRef",
        ),
        (401, "RepoNotFound", "Repository not found", "ModelAccessDenied", "spec.model.tokenSecretRef"),
        (401, None, "Invalid credentials in Authorization header", "ModelAccessDenied", "tokenSecretRef"),
        (403, None, "Forbidden", "ModelAccessDenied", "spec.model.tokenSecretRef"),
        (404, "RepoNotFound", "Repository not found", "ModelNotFound", "spec.model.repository"),
        (404, "RevisionNotFound", "Invalid rev id: v9", "RevisionNotFound", "spec.model.revision"),
        (404, "EntryNotFound", "Entry not found", "LoadFailed", "org/m@v9"),
        (500, None, "Internal Error", "LoadFailed", ENDPOINT),
    ],
)
def test_hub_errors_become_the_failure_a_person_can_fix(
    status: int, code: str | None, hub_message: str, reason: str, fix: str
) -> None:
    failure = load_error(_hub_error(status, code, hub_message), "org/m", "v9", ENDPOINT)
    assert failure.reason == reason
    assert fix in failure.message
    assert hub_message in failure.message


def test_a_full_disk_is_cache_full() -> None:
    failure = load_error(OSError(errno.ENOSPC, "No space left on device"), "org/m", None, ENDPOINT)
    assert failure.reason == "CacheFull"
    assert "spec.cache.size" in failure.message


def test_an_unreachable_hub_is_load_failed_naming_the_endpoint() -> None:
    failure = load_error(httpx2.ConnectError("Connection refused"), "org/m", None, ENDPOINT)
    assert failure.reason == "LoadFailed"
    assert ENDPOINT in failure.message
    assert "Connection refused" in failure.message
