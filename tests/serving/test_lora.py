"""Per-request LoRA adapters: three tiny random peft adapters (different ranks and targets, B non-zero) on
the tiny Llama. A mixed batch (base + 3 adapters, staggered) gives, per request, the greedy tokens of peft's
merged model for its adapter (float32, CPU); adapters never share prefix-cache blocks; adapters that do not
fit the base are refused at start naming them (the failure line the operator reads); through the server
(`--adapter`), the OpenAI SDK (`model=<adapter>`, completions and chat) and huggingface_hub (`adapter_id=`)
answer as peft does, unknown adapters get 404 `model_not_found` / 422, `/v1/models` lists them, `/status`
names them and `/metrics` has `vllm:lora_requests_info`; an adapter on the (stand-in) Hub is fetched with its
own token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import InferenceClient
from openai import NotFoundError, OpenAI
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from llm_contract import ADAPTER_FLAG, STATUS_PATH, adapter_arg, adapter_token_env, parse_failure
from llm_devstack.hub import StandInHub
from llm_serving.engine.engine import Engine
from llm_serving.engine.factory import EngineConfig, build_engine
from llm_serving.engine.lora import AdapterError, lora_batch, read_adapter
from llm_serving.engine.request import Request
from llm_serving.loading import load, resolve
from llm_serving.outputs import FailureEvent, TokenEvent
from llm_serving.sampling.params import SamplingParams, StoppingParams
from tests.serving import models
from tests.serving.conftest import Server, subprocess_server

# name -> LoraConfig arguments: ranks 4 / 8 / 2, attention only / MLP only with rsLoRA / both.
ADAPTERS: dict[str, dict[str, Any]] = {
    "alpha": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "beta": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "use_rslora": True,
    },
    "gamma": {"r": 2, "lora_alpha": 4, "target_modules": ["k_proj", "o_proj", "down_proj"]},
}
TEXTS = (
    "Once upon a time,",
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "In a quiet village by the sea there lived an old fisherman who",
    "Water boils at",
)
CAPACITY = 4096


def _base(model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]


def make_adapter(model_dir: Path, target: Path, seed: int, **config: Any) -> Path:
    """A random peft LoRA adapter for the model at `model_dir`, with B initialised non-zero."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(_base(model_dir), LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # peft's random init is small; scale up so that the adapters change greedy tokens
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(4.0)
    peft_model.save_pretrained(str(target))
    return target


@dataclass
class Setup:
    model_dir: Path
    adapters: dict[str, Path]
    model: Any
    tokenizer: Any
    _merged: dict[str | None, Any]

    def ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text)["input_ids"])

    def reference(self, adapter: str | None) -> Any:
        """The base model, or peft's merged model for `adapter`."""
        if adapter not in self._merged:
            base = _base(self.model_dir)
            self._merged[adapter] = (
                base
                if adapter is None
                else PeftModel.from_pretrained(base, self.adapters[adapter]).merge_and_unload().eval()
            )
        return self._merged[adapter]

    def generate(self, adapter: str | None, prompt: tuple[int, ...], max_new: int) -> list[int]:
        x = torch.tensor([prompt])
        out = self.reference(adapter).generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=None,
            pad_token_id=0,
        )
        tokens: list[int] = out[0, len(prompt) :].tolist()
        return tokens


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Setup:
    model_dir = models.tiny_model_dir()
    root = tmp_path_factory.mktemp("adapters")
    adapters = {
        name: make_adapter(model_dir, root / name, seed, **config)
        for seed, (name, config) in enumerate(ADAPTERS.items(), 1)
    }
    model, tokenizer = load(resolve(str(model_dir)), "float32")
    return Setup(model_dir, adapters, model, tokenizer, {})


def engine(s: Setup, **config: Any) -> Engine:
    folders = tuple(s.adapters.items())
    return build_engine(
        s.model, s.tokenizer, set(), EngineConfig(max_batch_total_tokens=CAPACITY, adapters=folders, **config)
    )


@pytest.fixture
def lora_engine(setup: Setup) -> Iterator[Engine]:
    e = engine(setup, block_size=4)
    yield e
    assert e.runner.lora is not None
    e.runner.lora.remove()


def request(i: int, prompt: tuple[int, ...], max_new: int, adapter: str | None) -> Request:
    return Request(i, prompt, SamplingParams(), StoppingParams(max_new_tokens=max_new), 0.0, adapter=adapter)


def drive(e: Engine, arrivals: dict[int, list[Request]]) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    step = 0
    while e.has_work or step <= max(arrivals):
        for r in arrivals.get(step, ()):
            e.add(r)
        events, _ = e.step()
        for event in events:
            assert isinstance(event, TokenEvent), event
            tokens.setdefault(event.request_id, []).append(event.token.id)
        step += 1
        assert step < 1000
    return tokens


def test_mixed_adapter_batch_matches_peft_merged_models(setup: Setup, lora_engine: Engine) -> None:
    names: list[str | None] = [None, *ADAPTERS]
    arrivals: dict[int, list[Request]] = {}
    expected: dict[int, tuple[str | None, tuple[int, ...], int]] = {}
    i = 0
    for k, text in enumerate(TEXTS[:4]):
        for j, adapter in enumerate(names):
            i += 1
            prompt, max_new = setup.ids(text), 6 + 2 * j + k
            arrivals.setdefault(k * 2 + j % 2, []).append(request(i, prompt, max_new, adapter))
            expected[i] = (adapter, prompt, max_new)
    got = drive(lora_engine, arrivals)
    for rid, (adapter, prompt, max_new) in expected.items():
        assert got[rid] == setup.generate(adapter, prompt, max_new), f"request {rid} with adapter {adapter}"
    differs = {
        a
        for a in ADAPTERS
        for p in map(setup.ids, TEXTS[:4])
        if setup.generate(a, p, 12) != setup.generate(None, p, 12)
    }
    assert differs == set(ADAPTERS), "an adapter left every greedy output as the base model's"


def test_a_prefix_run_by_two_adapters_shares_no_blocks(setup: Setup, lora_engine: Engine) -> None:
    prompt = setup.ids(" ".join(TEXTS))
    first = drive(lora_engine, {0: [request(1, prompt, 4, "alpha")]})
    hits = lora_engine.cache_stats().prefix_hits
    other = drive(lora_engine, {0: [request(2, prompt, 4, "beta")], 1: [request(3, prompt, 4, None)]})
    assert lora_engine.cache_stats().prefix_hits == hits, (
        "another adapter (or the base) reused alpha's blocks"
    )
    again = drive(lora_engine, {0: [request(4, prompt, 4, "alpha")]})
    assert lora_engine.cache_stats().prefix_hits > hits, "the same adapter's prefix was not reused"
    assert first[1] == again[4] == setup.generate("alpha", prompt, 4)
    assert other[2] == setup.generate("beta", prompt, 4)
    assert other[3] == setup.generate(None, prompt, 4)


def test_an_adapter_for_another_model_is_refused_naming_it(setup: Setup, tmp_path: Path) -> None:
    qwen = models.tiny_qwen3_dir()  # head_dim 32: its q_proj is 64 -> 128, the Llama's 64 -> 64
    folder = make_adapter(qwen, tmp_path / "qwen", 9, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match=r"'for-qwen'.*q_proj.*do not fit"):
        read_adapter("for-qwen", folder, setup.model)


def test_unsupported_peft_options_and_missing_files_are_refused(setup: Setup, tmp_path: Path) -> None:
    folder = tmp_path / "dora"
    make_adapter(setup.model_dir, folder, 3, r=2, lora_alpha=4, target_modules=["q_proj"])
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(AdapterError, match="'dora': DoRA is not supported"):
        read_adapter("dora", folder, setup.model)
    with pytest.raises(AdapterError, match=r"'empty'.*lacks adapter_config\.json") as info:
        read_adapter("empty", tmp_path, setup.model)
    assert info.value.reason == "ModelNotFound"


def test_a_request_for_an_adapter_not_loaded_fails_alone(setup: Setup, lora_engine: Engine) -> None:
    prompt = setup.ids(TEXTS[0])
    lora_engine.add(request(1, prompt, 3, "nope"))
    lora_engine.add(request(2, prompt, 3, "alpha"))
    events, _ = lora_engine.step()
    assert [e for e in events if isinstance(e, FailureEvent)] == [
        FailureEvent(1, "LoRA adapter 'nope' is not loaded")
    ]
    tokens = drive(lora_engine, {0: []})
    assert [e.token.id for e in events if isinstance(e, TokenEvent)] + tokens[2] == setup.generate(
        "alpha", prompt, 3
    )


def test_the_step_grouping_holds_each_adapters_tokens_and_is_none_without_adapter_rows() -> None:
    cpu = torch.device("cpu")
    assert lora_batch([0, 0], [3, 1], cpu) is None
    batch = lora_batch([2, 0, 1, 2], [2, 3, 1, 1], cpu)
    assert batch is not None
    assert batch.tokens == 7
    assert [(slot, t.tolist()) for slot, t in batch.groups] == [(1, [5]), (2, [0, 1, 6])]


@pytest.fixture(scope="module")
def lora_server(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny model and the three adapters behind the real entry point (`--adapter NAME=DIR`)."""
    log = tmp_path_factory.mktemp("lora-server") / "server.log"
    args = ["--model", str(setup.model_dir), "--max-input-tokens", "256", "--max-total-tokens", "512"]
    for name, folder in setup.adapters.items():
        args += [ADAPTER_FLAG, adapter_arg(name, str(folder))]
    with subprocess_server(args, log) as server:
        yield server


def sdk(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)


def test_openai_sdk_model_selects_the_adapter(setup: Setup, lora_server: Server) -> None:
    prompt = TEXTS[1]
    for model in ("alpha", "beta", setup.model_dir.name, "tgi"):
        adapter = None if model in ("tgi", setup.model_dir.name) else model
        done = sdk(lora_server).completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        want = setup.tokenizer.decode(setup.generate(adapter, setup.ids(prompt), 8), skip_special_tokens=True)
        assert done.choices[0].text == want, model
        assert done.model == (
            setup.model_dir.name if model == "tgi" else model
        )  # TGI names the base for `tgi`
    stream = sdk(lora_server).completions.create(
        model="gamma", prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in stream)
    assert text == setup.tokenizer.decode(
        setup.generate("gamma", setup.ids(prompt), 8), skip_special_tokens=True
    )


def test_openai_chat_with_an_adapter_as_model(setup: Setup, lora_server: Server) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    done = sdk(lora_server).chat.completions.create(
        model="beta",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=6,
        temperature=0,
    )
    prompt = setup.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tuple(setup.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    want = setup.tokenizer.decode(setup.generate("beta", ids, 6), skip_special_tokens=True)
    assert done.choices[0].message.content == want
    assert done.model == "beta"


def test_huggingface_hub_adapter_id_selects_the_adapter(setup: Setup, lora_server: Server) -> None:
    client = InferenceClient(base_url=lora_server.url, api_key=lora_server.api_key)
    prompt = TEXTS[2]
    for adapter in ("gamma", None):
        out = client.text_generation(prompt, max_new_tokens=8, adapter_id=adapter, details=True)
        assert out.details is not None
        assert [t.id for t in out.details.tokens] == setup.generate(adapter, setup.ids(prompt), 8), adapter
    streamed = client.text_generation(prompt, max_new_tokens=8, adapter_id="beta", stream=True, details=True)
    assert [event.token.id for event in streamed] == setup.generate("beta", setup.ids(prompt), 8)


def test_unknown_adapters_get_404_model_not_found_and_422(lora_server: Server) -> None:
    with pytest.raises(NotFoundError) as info:
        sdk(lora_server).completions.create(model="nope", prompt="hi", max_tokens=2)
    assert info.value.code == "model_not_found"
    with lora_server.client() as http:
        for path, body in (
            ("/v1/completions", {"model": "nope", "prompt": "hi"}),
            ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
            (
                "/v1/chat/completions",
                {"model": "nope", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            ),
        ):
            answer = http.post(path, json=body)
            assert answer.status_code == 404, path
            assert answer.json() == {
                "error": {
                    "message": "The model `nope` does not exist.",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            }
        for path in ("/generate", "/generate_stream"):
            answer = http.post(path, json={"inputs": "hi", "parameters": {"adapter_id": "nope"}})
            if path == "/generate":
                assert answer.status_code == 422
                error = answer.json()
            else:  # TGI: a stream's validation error is its first event, after a 200
                error = json.loads(answer.text.removeprefix("data:"))
            assert error["error_type"] == "validation"
            assert "'nope' is not a loaded LoRA adapter (loaded: alpha, beta, gamma)" in error["error"]


def test_models_lists_the_base_and_every_adapter(setup: Setup, lora_server: Server) -> None:
    assert [m.id for m in sdk(lora_server).models.list()] == [setup.model_dir.name, *ADAPTERS]
    with lora_server.client() as http:
        cards = http.get("/v1/models").json()["data"]
        status = http.get(STATUS_PATH).json()
    assert "parent" not in cards[0]
    assert all(card["parent"] == setup.model_dir.name and card["object"] == "model" for card in cards[1:])
    assert status["adapters"] == list(ADAPTERS)


def test_lora_requests_info_names_the_running_adapter(lora_server: Server) -> None:
    with lora_server.client() as http:
        body = {"inputs": TEXTS[3], "parameters": {"adapter_id": "alpha", "max_new_tokens": 200}}
        with http.stream("POST", "/generate_stream", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            metrics = http.get("/metrics").text
        after = http.get("/metrics").text
    info = [line for line in metrics.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1, metrics
    assert 'max_lora="3"' in info[0]
    assert 'running_lora_adapters="alpha"' in info[0]
    assert float(info[0].rsplit(" ", 1)[1]) > 1.7e9  # the time it was seen, as vLLM sets it
    assert "vllm:lora_requests_info{" in after


def test_the_server_refuses_to_start_with_an_adapter_that_does_not_fit(setup: Setup, tmp_path: Path) -> None:
    folder = make_adapter(
        models.tiny_qwen3_dir(), tmp_path / "qwen", 9, r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    args = [
        "--model",
        str(setup.model_dir),
        "--max-input-tokens",
        "256",
        "--max-total-tokens",
        "512",
        ADAPTER_FLAG,
        adapter_arg("bad", str(folder)),
    ]
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="server exited"), subprocess_server(args, log):
        pass
    failure = parse_failure(log.read_text())
    assert failure is not None
    assert failure.reason == "LoadFailed"
    assert failure.message is not None
    assert failure.message.startswith("LoRA adapter 'bad': model.layers.0.self_attn.q_proj")


def test_an_adapter_is_fetched_from_the_hub_with_its_own_token(setup: Setup, tmp_path: Path) -> None:
    """Through the stand-in Hub (no Hub here): a private adapter repo at a pinned commit, read with the token
    in the adapter's own env."""
    with StandInHub() as hub:
        commit = hub.add_repo("org/alpha-lora", setup.adapters["alpha"], private=True, tokens={"hf_lora"})
        args = ["--model", str(setup.model_dir), "--max-input-tokens", "256", "--max-total-tokens", "512"]
        args += [ADAPTER_FLAG, adapter_arg("alpha", "org/alpha-lora", commit)]
        env = {
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_OFFLINE": "0",
            adapter_token_env("alpha"): "hf_lora",
        }
        with subprocess_server(args, tmp_path / "server.log", env=env) as server, server.client() as http:
            body = {
                "inputs": TEXTS[0],
                "parameters": {"adapter_id": "alpha", "max_new_tokens": 6, "details": True},
            }
            out = http.post("/generate", json=body).json()
        fetched = {r.file for r in hub.log if r.repo_id == "org/alpha-lora" and r.status == 200}
    assert [t["id"] for t in out["details"]["tokens"]] == setup.generate("alpha", setup.ids(TEXTS[0]), 6)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= fetched
