"""One JSON object per log line, carrying the endpoint (`namespace`, `endpoint`) when the record has it."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

LEVELS = ("debug", "info", "warning", "error")
"""The `--log-level` choices of the operator and the gateway."""
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_DROPPED = {"settings"}  # kopf attaches its whole settings object to some records


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, then every `extra=` field (namespace, endpoint, phase, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key == "k8s_ref" and isinstance(value, dict):  # kopf's per-object loggers
                line.setdefault("namespace", value.get("namespace"))
                line.setdefault("object", f"{value.get('kind')}/{value.get('name')}")
            elif key not in _STANDARD and key not in _DROPPED and not key.startswith("k8s_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the operator and kopf alike."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if level > logging.DEBUG:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one line per watch event otherwise
