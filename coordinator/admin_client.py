"""The admin commands of fedpipe-coordinator: submit, runs, status, cancel and logs, over the admin API.

Each connects to a serving coordinator as an admin: with an admin certificate (`fedpipe-coordinator certs
--admin NAME`) under mTLS, or an admin token under token auth. Every connection flag may also come from
the environment (FEDPIPE_ADMIN_COORDINATOR, _CA, _CERT, _KEY, _TOKEN_FILE, _SERVER_NAME, _INSECURE=1).
Exit codes: 0 done, 1 refused or unreachable, 2 a usage error or a run the coordinator found wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc

from common.errors import ConfigError
from common.rpc import make_channel
from common.security import channel_credentials

PROG = "fedpipe-coordinator"
TIMEOUT_S = 30.0


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--coordinator", default=env("FEDPIPE_ADMIN_COORDINATOR", "127.0.0.1:50051"), help="host:port")
    common.add_argument(
        "--ca", type=Path, default=env("FEDPIPE_ADMIN_CA"), help="CA certificate the server's chains to"
    )
    common.add_argument("--cert", type=Path, default=env("FEDPIPE_ADMIN_CERT"), help="admin certificate (mtls)")
    common.add_argument("--key", type=Path, default=env("FEDPIPE_ADMIN_KEY"), help="its private key (mtls)")
    common.add_argument(
        "--token-file", type=Path, default=env("FEDPIPE_ADMIN_TOKEN_FILE"), help="admin token (token auth)"
    )
    common.add_argument(
        "--server-name", default=env("FEDPIPE_ADMIN_SERVER_NAME"), help="name the server's certificate holds"
    )
    common.add_argument(
        "--insecure",
        action="store_true",
        default=env("FEDPIPE_ADMIN_INSECURE") == "1",
        help="plaintext (a --insecure coordinator)",
    )
    parser = argparse.ArgumentParser(prog=PROG, description="Talk to a serving fedpipe-coordinator as an admin.")
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser("submit", parents=[common], help="queue a run")
    submit.add_argument("config", type=Path, help="the run's YAML (a coordinator config less server, tls, metrics)")
    submit.add_argument("--name", default="", help="a label for the run")
    submit.add_argument("--follow", action="store_true", help="then follow its log until it ends")
    commands.add_parser("runs", parents=[common], help="list every run")
    for name, what in (("status", "one run's status"), ("cancel", "cancel a queued or running run")):
        command = commands.add_parser(name, parents=[common], help=what)
        command.add_argument("run", help="run id (or a unique prefix)")
    logs = commands.add_parser("logs", parents=[common], help="a run's coordinator log")
    logs.add_argument("run", help="run id (or a unique prefix)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep following until the run ends")
    logs.add_argument("--tail", type=int, default=0, help="only the last N lines written so far")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run one admin command; returns the exit code."""
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 2
    try:
        credentials = None if args.insecure else channel_credentials(args.ca, args.cert, args.key, args.token_file)
        if args.command == "submit":
            text = args.config.read_text()
    except (ConfigError, OSError) as err:
        print(f"{PROG} {args.command}: {err}", file=sys.stderr)
        return 2
    with make_channel(args.coordinator, credentials, args.server_name) as channel:
        stub = pb_grpc.AdminStub(channel)
        try:
            return _command(stub, args, text if args.command == "submit" else "")
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            print(f"{PROG} {args.command}: {code.name}: {details}", file=sys.stderr)
            return 2 if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) else 1


def _command(stub: pb_grpc.AdminStub, args: argparse.Namespace, text: str) -> int:
    if args.command == "submit":
        status = stub.SubmitRun(pb.SubmitRunRequest(config_yaml=text, name=args.name), timeout=TIMEOUT_S)
        print(f"run {status.run_id} queued (position {status.queue_position}); its directory: {status.run_dir}")
        if args.follow:
            return _follow(stub, status.run_id, 0)
        return 0
    if args.command == "runs":
        runs = stub.ListRuns(pb.ListRunsRequest(), timeout=TIMEOUT_S).runs
        print(table(runs))
        return 0
    if args.command == "status":
        print(describe(stub.GetRun(pb.GetRunRequest(run_id=args.run), timeout=TIMEOUT_S)))
        return 0
    if args.command == "cancel":
        status = stub.CancelRun(pb.CancelRunRequest(run_id=args.run), timeout=TIMEOUT_S)
        what = "cancelled" if status.state == "cancelled" else "stops at its next wait"
        print(f"run {status.run_id} {what}")
        return 0
    if args.follow:
        return _follow(stub, args.run, args.tail)
    for part in stub.StreamLogs(pb.StreamLogsRequest(run_id=args.run, tail=args.tail), timeout=TIMEOUT_S):
        for line in part.lines:
            print(line)
    return 0


def _follow(stub: pb_grpc.AdminStub, run_id: str, tail: int) -> int:
    """Print the run's log as it grows; exit 0 when it completed, 1 otherwise."""
    for part in stub.StreamLogs(pb.StreamLogsRequest(run_id=run_id, follow=True, tail=tail)):
        for line in part.lines:
            print(line, flush=True)
    status = stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=TIMEOUT_S)
    print(f"run {status.run_id} {status.state}: {status.message}", flush=True)
    return 0 if status.state == "completed" else 1


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def _rounds(status: pb.RunStatus) -> str:
    return f"{status.round}/{status.rounds}" if status.rounds else "-"


def table(runs: Sequence[pb.RunStatus]) -> str:
    """The runs as an aligned table, oldest first."""
    rows = [("RUN", "STATE", "ROUND", "ACCURACY", "SUBMITTED", "NAME")]
    for status in runs:
        state = f"{status.state} (#{status.queue_position})" if status.queue_position else status.state
        accuracy = f"{status.final_accuracy:.3f}" if status.has_accuracy else "-"
        rows.append((status.run_id, state, _rounds(status), accuracy, _when(status.submitted_at), status.name))
    if len(rows) == 1:
        return "no runs"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def describe(status: pb.RunStatus) -> str:
    """One run's status, a field a line."""
    lines = [
        f"run:       {status.run_id}" + (f" ({status.name})" if status.name else ""),
        f"state:     {status.state}" + (f", #{status.queue_position} in the queue" if status.queue_position else ""),
        f"submitted: {_when(status.submitted_at)}",
        f"started:   {_when(status.started_at)}",
        f"ended:     {_when(status.ended_at)}",
    ]
    if status.state == "running":
        lines.append(f"round:     {_rounds(status)}, {status.agents} agents registered")
    if status.has_accuracy:
        lines.append(f"accuracy:  {status.final_accuracy:.3f}")
    if status.message:
        lines.append(f"message:   {status.message}")
    lines.append(f"directory: {status.run_dir}")
    return "\n".join(lines)
