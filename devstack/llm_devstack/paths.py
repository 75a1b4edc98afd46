"""Where the dev stack finds the checkout it runs (the repository's CRDs, examples and Go tools modules) and
the cache it keeps outside the clone."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository (the dev stack is installed from it, editable, as a uv workspace member)."""
TOOLS = ROOT / "devstack" / "tools"
CRD = ROOT / "crds" / "llmendpoints.yaml"
EXAMPLES = ROOT / "examples"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-endpoints"
"""Binaries, images and node state that outlive a clone (`${XDG_CACHE_HOME:-~/.cache}/llm-endpoints`)."""
