"""Logging set-up for both processes: one readable line per event, or JSON lines with a flag."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: anything that could end a log
# line or steer a terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """text with every control character written as a visible escape (\\n, \\x1b, \\u2028)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _clean(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    return escape(value if isinstance(value, str) else str(value))


class EscapeControl(logging.Filter):
    """Escapes control characters in every argument of a record (agent ids, messages, refusals: anything an
    agent sent), and in a message that comes without arguments, so no agent can forge or split log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, Mapping):
            record.args = {key: _clean(value) for key, value in record.args.items()}
        elif record.args:
            record.args = tuple(_clean(value) for value in record.args)
        elif isinstance(record.msg, str):
            record.msg = escape(record.msg)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, process, level, logger, message, and exception text if any."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "process": self.process,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def formatter(name: str, fmt: str = "text") -> logging.Formatter:
    """The line format of a process's logs: '<time> <name> <level> message', or JSON lines."""
    if fmt == "json":
        return JsonFormatter(name)
    return logging.Formatter(f"%(asctime)s {name} %(levelname)s %(message)s", "%H:%M:%S")


def setup(name: str, fmt: str = "text", level: int = logging.INFO) -> None:
    """Route logs to stderr as text ('<time> <name> <level> message') or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(name, fmt))
    handler.addFilter(EscapeControl())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("transformers", "peft", "bitsandbytes", "urllib3", "httpx", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
