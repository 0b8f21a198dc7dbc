"""Log lines: one per lifecycle event with its duration; ``--log-format json`` for machines.

``configured_logging`` installs the handler for the duration of a ``with`` block and restores the previous
state after (STYLE 7: process-wide side effects are scoped).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        ms = int(record.msecs)
        return f"{time.strftime(datefmt or '%H:%M:%S', time.localtime(record.created))}.{ms:03d}"


@contextlib.contextmanager
def configured_logging(fmt: str = "text", level: str = "info") -> Iterator[None]:
    root = logging.getLogger("coldstart")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    old_level, old_propagate = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        root.propagate = old_propagate
