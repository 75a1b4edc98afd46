"""Where the dev stack finds the checkout it runs: the repository's CRDs, examples and Go tools modules."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository (the dev stack is installed from it, editable, as a uv workspace member)."""
TOOLS = ROOT / "devstack" / "tools"
CRD = ROOT / "crds" / "llmendpoints.yaml"
EXAMPLES = ROOT / "examples"
