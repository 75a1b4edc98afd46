"""The HTTP side of the server (routes, response bodies, metrics, the output types) loads no torch."""

from __future__ import annotations

import subprocess
import sys

MODULES = (
    "llm_serving.http.app",
    "llm_serving.tgi_bodies",
    "llm_serving.openai_bodies",
    "llm_serving.outputs",
    "llm_serving.metrics",
    "llm_serving.download",
    "llm_serving.__main__",  # the entry point binds its port before the model's libraries load
    "llm_serving.server",
    "llm_serving.source",
    "llm_serving.tgi_headers",
)


def test_http_side_imports_no_torch() -> None:
    script = (
        "import sys\n"
        + "".join(f"import {module}\n" for module in MODULES)
        + "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))"
    )
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == ""
