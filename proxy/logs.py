"""Logging: plain text (default) or one JSON object per line (`--log-format json`).

Records may carry extra fields (`log.info("client closed", extra={"route": r, "peer": p,
"event": "client_closed", "reason": "client"})`): the text format appends them as
`key=value`, the JSON format as members. Credentials in `redis://user:password@host`
URLs are masked in every message and field, whatever the caller passed: values and
passwords are never logged.

In a worker of several (`--workers N`), every line says which one wrote it: the text
format puts `worker=N` after the logger name, the JSON format a `"worker": N` member.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

from proxy.schema import FORMATS, LEVELS  # noqa: F401  (re-exported)

WORKER_ENV = "KEYSPACE_PROXY_WORKER"   # set in a worker of several (proxy/workers.py): its index

# The attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

_CREDENTIALS = re.compile(r"(\brediss?(?:\+sentinel|\+cluster)?://)([^:/@\s]*):([^@\s]*)@")


def mask_credentials(text: str) -> str:
    """`redis://user:secret@h:1/0` -> `redis://user:***@h:1/0` anywhere in `text`."""
    return _CREDENTIALS.sub(lambda m: f"{m.group(1)}{m.group(2)}:***@", text)


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _clean(value):
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, (tuple, list)) and len(value) >= 2 and isinstance(value[1], int):
        host = str(value[0])  # a (host, port) peer; IPv6 in brackets
        value = f"[{host}]:{value[1]}" if ":" in host else f"{host}:{value[1]}"
    elif isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return mask_credentials(str(value))


class TextFormatter(logging.Formatter):
    """`2024-05-01T12:00:00.123Z INFO keyspace-proxy: message key=value ...`; in worker 1
    of several, `... INFO keyspace-proxy worker=1: message ...`."""

    def __init__(self, worker: int | None = None):
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        who = record.name if self.worker is None else f"{record.name} worker={self.worker}"
        line = f"{_timestamp(record)} {record.levelname} {who}: {mask_credentials(record.getMessage())}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_quote(_clean(v))}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + mask_credentials(self.formatException(record.exc_info))
        return line


def _quote(v) -> str:
    s = str(v)
    return json.dumps(s) if (not s or any(c in s for c in ' "=\n')) else s


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, (worker,) msg, then the record's extra fields."""

    def __init__(self, worker: int | None = None):
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name}
        if self.worker is not None:
            out["worker"] = self.worker
        out["msg"] = mask_credentials(record.getMessage())
        for k, v in _extras(record).items():
            if k not in out:
                out[k] = _clean(v)
        if record.exc_info:
            out["exc"] = mask_credentials(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def current_worker() -> int | None:
    """This process's worker index under a supervisor, or None."""
    value = os.environ.get(WORKER_ENV, "")
    return int(value) if value.isdigit() else None


def setup_logging(level: str = "info", fmt: str = "text", stream=None, worker: int | None = None) -> logging.Handler:
    """Configure the root logger: one stderr handler with the chosen format. Idempotent.
    `worker` (default: from the environment a supervisor sets) tags every line."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_keyspace_proxy", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    worker = current_worker() if worker is None else worker
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else TextFormatter(worker))
    handler._keyspace_proxy = True
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    return handler
