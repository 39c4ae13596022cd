"""Log lines: JSON with --log-format json (one object per line, every field a log shipper needs)."""

from __future__ import annotations

import json
import logging
import sys

from common.logs import JsonFormatter


def test_json_lines_carry_time_process_level_logger_message_and_traceback() -> None:
    # Prepare
    formatter = JsonFormatter("agent[site-a]")
    try:
        raise ValueError("bad shard")
    except ValueError:
        record = logging.LogRecord("fedpipe.agent", logging.ERROR, __file__, 1, "round %d failed", (3,), sys.exc_info())

    # Execute
    line = formatter.format(record)

    # Assert
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["process"] == "agent[site-a]" and entry["level"] == "error" and entry["logger"] == "fedpipe.agent"
    assert entry["msg"] == "round 3 failed"
    assert entry["ts"].endswith("Z") and "ValueError: bad shard" in entry["exc"]
