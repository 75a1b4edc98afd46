"""`@huggingface/inference` from npm (the current release and a 2.x one), under Node's test runner, against
the live tiny server."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.serving.conftest import Server

JS = Path(__file__).parent / "js"


def test_huggingface_inference_js(tiny_server: Server) -> None:
    for tool in ("node", "npm"):
        assert shutil.which(tool), f"{tool} is missing: Node.js 20 with npm is needed (see the README)"
    installed = (JS / "node_modules" / "@huggingface" / "inference", JS / "node_modules" / "hf-inference-v2")
    if not all(package.is_dir() for package in installed):
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, capture_output=True, timeout=300
        )
    env = dict(os.environ, LLM_URL=tiny_server.url, LLM_TOKEN=tiny_server.api_key or "")
    result = subprocess.run(
        ["node", "--test", "client.test.mjs"], cwd=JS, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
