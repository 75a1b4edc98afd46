"""What the serving image and the operator's image must agree on: the serving container's port and
environment, and how a bearer token travels. Pure, with no dependencies, so both images install it (the
operator-side names live in `llm_operator.contract`, which re-exports these)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

SERVING_PORT = 3000
"""Port the serving container listens on: the server's default and the port the operator renders."""
API_KEY_ENV = "API_KEY"
"""Env of a protected endpoint's serving container: the bearer token its server requires."""
GRACEFUL_SHUTDOWN_ENV = "GRACEFUL_SHUTDOWN_SECONDS"
"""Env of the serving container: how long the server drains open streams after SIGTERM."""


def bearer(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value (scheme case-insensitive), or None."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


REVISION_ENV = "REVISION"
"""Env of the serving container: the Hub revision to load; the operator renders the resolved commit."""
HF_ENDPOINT_ENV = "HF_ENDPOINT"
"""Env of the serving container and the operator's setting: the Hub's URL, as `huggingface_hub` reads it."""
STATUS_PATH = "/status"
"""Route of the serving container that reports its loading progress from its first second, without the API
key (like `/health`): a JSON `LoadStatus`."""

LOAD_PHASES = ("Starting", "Resolving", "Downloading", "LoadingWeights", "WarmingUp", "Ready", "Failed")
"""The serving process's loading phases, in order (`Failed` can follow any of them)."""
LOAD_FAILURE_REASONS = (
    "ModelAccessDenied",
    "RevisionNotFound",
    "ModelNotFound",
    "CacheFull",
    "WeightsCorrupt",
    "LoadFailed",
)
"""Why a model could not load: a gated or private repo without a valid token, a missing revision, a missing
repository, a full cache volume, a file that fails its hash, anything else."""
LOAD_FAILURE_PREFIX = "llm-serving load failure: "
"""Prefix of the serving process's last log line when its model cannot load, followed by the JSON of a
`LoadStatus` in phase `Failed`. The operator reads it from the container's termination message
(`terminationMessagePolicy: FallbackToLogsOnError`)."""


@dataclass(frozen=True)
class LoadStatus:
    """What `/status` answers and what a load failure's last log line carries."""

    phase: str
    done_bytes: int = 0
    """Bytes downloaded (`Downloading`) or read to the device (`LoadingWeights`) so far."""
    total_bytes: int = 0
    """Bytes the phase has to move; 0 when unknown."""
    revision: str | None = None
    """The commit being loaded, once resolved."""
    reason: str | None = None
    """One of LOAD_FAILURE_REASONS when `phase` is `Failed`."""
    message: str | None = None
    """What to fix (the Hub's own message where it gave one), or what the phase is doing."""
    adapters: tuple[str, ...] = ()
    """Names of the LoRA adapters loaded."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object (camelCase keys)."""
        return {
            "phase": self.phase,
            "doneBytes": self.done_bytes,
            "totalBytes": self.total_bytes,
            "revision": self.revision,
            "reason": self.reason,
            "message": self.message,
            "adapters": list(self.adapters),
        }

    @classmethod
    def from_json(cls, raw: Any) -> LoadStatus:
        """Parse `to_json`'s output; ValueError when it is not one."""
        if not isinstance(raw, dict) or raw.get("phase") not in LOAD_PHASES:
            raise ValueError(f"not a load status: {raw!r:.200}")
        done, total = raw.get("doneBytes", 0), raw.get("totalBytes", 0)
        reason, adapters = raw.get("reason"), raw.get("adapters") or []
        if not (isinstance(done, int) and isinstance(total, int) and done >= 0 and total >= 0):
            raise ValueError("doneBytes and totalBytes must be non-negative integers")
        if reason is not None and reason not in LOAD_FAILURE_REASONS:
            raise ValueError(f"unknown load failure reason {reason!r:.80}")
        if not (isinstance(adapters, list) and all(isinstance(a, str) for a in adapters)):
            raise ValueError("adapters must be a list of names")
        text = {k: raw.get(k) for k in ("revision", "message")}
        if any(v is not None and not isinstance(v, str) for v in text.values()):
            raise ValueError("revision and message must be strings")
        return cls(raw["phase"], done, total, text["revision"], reason, text["message"], tuple(adapters))


def failure_line(status: LoadStatus) -> str:
    """The last log line of a serving process whose model failed to load."""
    return LOAD_FAILURE_PREFIX + json.dumps(status.to_json(), separators=(",", ":"))


def parse_failure(log_tail: str) -> LoadStatus | None:
    """The load failure in a container's termination message (its log tail), if its last such line is one."""
    for line in reversed(log_tail.splitlines()):
        _, found, rest = line.partition(LOAD_FAILURE_PREFIX)
        if found:
            try:
                status = LoadStatus.from_json(json.loads(rest))
            except ValueError:
                return None
            return status if status.phase == "Failed" else None
    return None


ADAPTER_FLAG = "--adapter"
"""Serving flag, repeatable: one LoRA adapter as `NAME=SOURCE` or `NAME=SOURCE@REVISION`; SOURCE is read like
`--model` (a local directory, `pkg:<package>`, or a Hub repo id)."""


def adapter_arg(name: str, source: str, revision: str | None = None) -> str:
    """The value of one `--adapter` flag."""
    return f"{name}={source}" + (f"@{revision}" if revision else "")


def parse_adapter_arg(value: str) -> tuple[str, str, str | None]:
    """(name, source, revision) of an `--adapter` value; ValueError when it has no name or source."""
    name, _, rest = value.partition("=")
    source, _, revision = rest.partition("@")
    if not name or not source:
        raise ValueError(f"--adapter takes NAME=SOURCE[@REVISION], not {value!r}")
    return name, source, revision or None


def adapter_token_env(name: str) -> str:
    """Env of the serving container holding the Hub token of adapter `name` (when it names a Secret)."""
    return "ADAPTER_TOKEN_" + "".join(c if c.isalnum() else "_" for c in name.upper())
