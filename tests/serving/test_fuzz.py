"""Schemathesis over `/openapi.json`: no generated request may get a 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llm_serving.config import Limits
from tests.serving.conftest import thread_server


def test_openapi_fuzz_has_no_server_errors(tiny_dir: Path, tmp_path: Path) -> None:
    st = Path(sys.executable).parent / "st"
    assert st.exists(), "schemathesis is missing from the virtualenv: run `make venv`"
    # Small budgets keep every generated request short.
    limits = Limits(max_input_tokens=32, max_total_tokens=48, max_batch_total_tokens=4096)
    with thread_server(tiny_dir, limits) as server:
        cmd = [
            str(st),
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "8",
            "--generation-deterministic",
            "--request-timeout",
            "60",
            "-H",
            f"Authorization: Bearer {server.api_key}",
            "--report-dir",
            str(tmp_path),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
