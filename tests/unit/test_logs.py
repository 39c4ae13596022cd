"""Log lines: JSON with --log-format json (one object per line, every field a log shipper needs)."""

from __future__ import annotations

import json
import logging
import sys

from common.logs import EscapeControl, JsonFormatter, escape, setup


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


def test_control_characters_in_arguments_are_escaped_so_no_line_can_be_forged() -> None:
    # Prepare: an agent id and a refusal message as an attacker would send them
    record = logging.LogRecord(
        "coordinator",
        logging.WARNING,
        __file__,
        1,
        "agent %s: %s (%d)",
        ("evil\n12:00:00 coordinator INFO ok", ValueError("x\x1b[2J\u2028y"), 3),
        None,
    )

    # Execute
    EscapeControl().filter(record)
    line = record.getMessage()

    # Assert: one line, every control character visible, numbers untouched
    assert line == "agent evil\\n12:00:00 coordinator INFO ok: x\\x1b[2J\\u2028y (3)"
    assert "\n" not in line and "\x1b" not in line


def test_a_message_without_arguments_and_mapping_arguments_are_escaped_too() -> None:
    # Prepare
    bare = logging.LogRecord("c", logging.INFO, __file__, 1, "line one\rline two", None, None)
    mapped = logging.LogRecord("c", logging.INFO, __file__, 1, "%(who)s", ({"who": "a\tb"},), None)

    # Execute
    EscapeControl().filter(bare)
    EscapeControl().filter(mapped)

    # Assert
    assert bare.getMessage() == "line one\\rline two"
    assert mapped.getMessage() == "a\\tb"


def test_setup_escapes_on_the_handler_it_installs() -> None:
    # Prepare
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        # Execute
        setup("coordinator")
        handler = root.handlers[0]
    finally:
        root.handlers[:], root.level = saved, level

    # Assert
    assert any(isinstance(f, EscapeControl) for f in handler.filters)
    assert escape("plain text, no controls") == "plain text, no controls"
