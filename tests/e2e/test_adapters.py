"""LoRA adapters through the whole system: an LLMEndpoint with `spec.adapters` (three tiny random peft
adapters this test writes, as `path:` sources inside the container) over the tiny random Llama (`model.pvc`)
answers per adapter through the gateway, with the greedy tokens of peft's merged model for that adapter;
`/v1/models` lists them and the endpoint's status shows them. The model and the adapters reach the pod on a
hostPath volume (a PersistentVolumeClaim bound to one host folder), mounted read-only at the operator's
model mount."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import InferenceClient
from openai import NotFoundError, OpenAI
from transformers import AutoTokenizer

from llm_contract import SERVING_PORT, STATUS_PATH
from llm_devstack.node.volumes import HOST_STORAGE, host_volume
from llm_devstack.waits import wait_for
from llm_operator.render import MODEL_MOUNT
from tests.cluster.operator_support import get, kubectl_apply
from tests.e2e.conftest import CACHE_SIZE, Stack
from tests.serving import models
from tests.serving.test_lora import ADAPTERS, TEXTS, Setup, make_adapter

pytestmark = pytest.mark.cluster
NAME = "lora"
MODELS = "lora-models"
"""The PersistentVolumeClaim holding the model and its adapters."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """The tiny Llama, its three adapters on disk, and peft's merged models as the reference."""
    model_dir = models.tiny_model_dir()
    root = tmp_path_factory.mktemp("e2e-adapters")
    adapters = {
        name: make_adapter(model_dir, root / name, seed, **config)
        for seed, (name, config) in enumerate(ADAPTERS.items(), 1)
    }
    return Setup(model_dir, adapters, None, AutoTokenizer.from_pretrained(model_dir), {})


def status(stack: Stack) -> dict[str, Any]:
    return dict(get(stack.cluster, "llmendpoint", NAME, "-n", stack.namespace).get("status") or {})


def models_volume(stack: Stack, setup: Setup, folder: Path) -> None:
    """The claim MODELS of the stack's namespace on the host folder `folder`: the model in its folder's name,
    each adapter in its own name, all readable by the serving image's non-root user."""
    shutil.copytree(setup.model_dir, folder / setup.model_dir.name)
    for name, adapter in setup.adapters.items():
        shutil.copytree(adapter, folder / name)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    host_volume(stack.cluster, stack.namespace, MODELS, folder, CACHE_SIZE)
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": MODELS, "namespace": stack.namespace},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": HOST_STORAGE,
            "resources": {"requests": {"storage": CACHE_SIZE}},
        },
    }
    kubectl_apply(stack.cluster, claim)


@pytest.fixture(scope="module")
def served(stack: Stack, setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The endpoint applied and Running; its URL through the gateway."""
    models_volume(stack, setup, tmp_path_factory.mktemp("e2e-models"))
    adapters = [{"name": name, "path": f"{MODEL_MOUNT}/{name}"} for name in setup.adapters]
    body = stack.endpoint(
        NAME,
        False,
        model={"pvc": {"claimName": MODELS, "subPath": setup.model_dir.name}, "dtype": "float32"},
        scaling={"minReplicas": 1, "maxReplicas": 1},
        adapters=adapters,
    )
    kubectl_apply(stack.cluster, body)

    def running() -> dict[str, Any] | None:
        current = status(stack)
        assert current.get("phase") != "Failed", current
        return current if current.get("phase") == "Running" else None

    return str(wait_for(running, 300, f"{NAME} Running")["url"])


def test_each_adapter_answers_through_the_gateway_as_peft_merged(setup: Setup, served: str) -> None:
    client = InferenceClient(base_url=served, timeout=120)
    sdk = OpenAI(base_url=f"{served}/v1", api_key="unused", timeout=120)
    prompt = TEXTS[1]
    answers = {}
    for adapter in (*ADAPTERS, None):
        out = client.text_generation(
            prompt, max_new_tokens=8, adapter_id=adapter, details=True, return_full_text=False
        )
        assert out.details is not None
        tokens = [t.id for t in out.details.tokens]
        assert tokens == setup.generate(adapter, setup.ids(prompt), 8), adapter
        answers[adapter] = tokens
        model = adapter or "tgi"
        done = sdk.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        assert done.choices[0].text == out.generated_text, model
        assert done.model == (adapter or setup.model_dir.name)  # TGI names the base for `tgi`
    assert len({tuple(t) for t in answers.values()}) == len(answers)  # every adapter changes the tokens

    streamed = client.text_generation(prompt, max_new_tokens=8, adapter_id="beta", stream=True, details=True)
    assert [event.token.id for event in streamed] == answers["beta"]


def test_models_lists_the_adapters_and_an_unknown_one_is_not_found(setup: Setup, served: str) -> None:
    sdk = OpenAI(base_url=f"{served}/v1", api_key="unused", timeout=120)
    assert [m.id for m in sdk.models.list()] == [setup.model_dir.name, *ADAPTERS]
    with pytest.raises(NotFoundError) as info:
        sdk.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert info.value.code == "model_not_found"
    refused = httpx.post(
        f"{served}/generate", json={"inputs": "hi", "parameters": {"adapter_id": "nope"}}, timeout=60
    )
    assert refused.status_code == 422
    assert refused.json()["error_type"] == "validation"


def test_the_status_shows_the_adapters_loaded(stack: Stack, served: str) -> None:
    (pod,) = get(stack.cluster, "pods", "-n", stack.namespace, "-l", f"llm-endpoints.io/endpoint={NAME}")[
        "items"
    ]
    replica = httpx.get(f"http://{pod['status']['podIP']}:{SERVING_PORT}{STATUS_PATH}", timeout=10).json()
    assert replica["adapters"] == list(ADAPTERS)  # what the replica itself reports loaded
    wait_for(lambda: status(stack).get("adapters") == sorted(ADAPTERS), 60, "status.adapters")
