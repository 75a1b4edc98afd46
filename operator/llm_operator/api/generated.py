"""The command line of a file generated from the API (the CRD, the API reference): write it, or check it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def main(description: str, default_output: Path, text: Callable[[], str], argv: list[str] | None) -> int:
    """Writes `text()` to `--output`; with `--check`, exits 1 when the file there differs instead."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=default_output, help="file to write or check")
    parser.add_argument("--check", action="store_true", help="fail when the file differs from its source")
    args = parser.parse_args(argv)
    return write_or_check(args.output, text(), check=args.check)


def write_or_check(output: Path, text: str, *, check: bool) -> int:
    """Writes a generated file, or with `check` exits 1 when the checked-in one differs (run `make crds`)."""
    if check:
        current = output.read_text() if output.exists() else ""
        if current != text:
            print(f"{output} is stale: run `make crds`", file=sys.stderr)
            return 1
        print(f"{output} is up to date")
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"wrote {output}")
    return 0
