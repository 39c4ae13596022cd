"""fedpipe-coordinator: build the config once, wire the parts, serve agents and run every round."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

from common import logs
from common.base_id import KNOWN as KNOWN_BASES
from common.errors import ConfigError, FedPipeError
from common.settings import build

if TYPE_CHECKING:
    from common.security import ServerSecurity
    from common.types import ModelSpec
    from coordinator.config import CoordinatorConfig
    from coordinator.metrics import CoordinatorMetrics
    from coordinator.modes import Mode
    from coordinator.orchestrator import Orchestrator
    from coordinator.planner import Planner, PlanOptions, SearchSpace
    from coordinator.service import Service
    from coordinator.strategy import Strategy

log = logging.getLogger("fedpipe.coordinator")
C = TypeVar("C", bound="CoordinatorConfig")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of fedpipe-coordinator; returns the exit code."""
    from coordinator.config import CoordinatorConfig

    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["plan"]:
        return explain(args[1:])
    if args[:1] == ["certs"]:
        from common.certs import certs_main

        return certs_main(args[1:])
    if args[:1] == ["token"]:
        return token(args[1:])
    if args[:1] == ["simulate"]:
        from coordinator.simulate import main as simulate

        return simulate(args[1:])
    if args[:1] == ["serve"]:
        return launch(CoordinatorConfig, args[1:], "fedpipe-coordinator serve", serve, run_dir=False)
    if args[:1] and args[0] in ADMIN_COMMANDS:
        from coordinator.admin_client import main as admin

        return admin(args)
    return launch(CoordinatorConfig, args, "fedpipe-coordinator", run)


ADMIN_COMMANDS = ("submit", "runs", "status", "cancel", "logs")


def launch(settings: type[C], args: Sequence[str], prog: str, body: Callable[[C], int], run_dir: bool = True) -> int:
    """Build the config (exit 2 naming what is wrong, before anything starts), set up logging, run body;
    domain errors become exit codes 2 (config) and 1 (the rest). run_dir: make run.run_dir first."""
    try:
        config = build(settings, args, prog)
        if run_dir:
            config.run.run_dir.mkdir(parents=True, exist_ok=True)
    except (ConfigError, OSError) as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return 2
    logs.setup("coordinator", config.log_format)
    try:
        return body(config)
    except ConfigError as err:
        log.error("config error: %s", err)
        return 2
    except FedPipeError as err:
        log.error("%s", err)
        return 1


def _security(config: CoordinatorConfig) -> ServerSecurity:
    """Credentials first: a bad certificate path must not leave a half-started coordinator behind."""
    from common.security import server_security

    tls = config.tls
    security = server_security(
        config.insecure, tls.cert, tls.key, tls.auth, tls.client_ca, tls.tokens, config.admin.tokens, config.admin.names
    )
    if config.insecure:
        log.warning("--insecure: plaintext gRPC and no agent or admin authentication; use only on a trusted network")
    return security


def _serving_line(config: CoordinatorConfig, port: int, what: str) -> None:
    tls = config.tls
    secured = "plaintext" if config.insecure else f"TLS, {tls.auth} auth"
    log.info(
        "serving fedpipe.v1.Coordinator and fedpipe.v1.Admin on %s:%d (%s, %s)", config.server.host, port, secured, what
    )


def run(config: CoordinatorConfig) -> int:
    """The one-shot coordinator: a service with one run (config's), which exits when the run ends."""
    from coordinator.jobs import JobQueue
    from coordinator.rundir import saved_state
    from coordinator.service import Service

    security = _security(config)
    service = Service(config, security, JobQueue(None))
    service.single = True
    orchestrator = assemble(config, metrics=service.metrics).orchestrator
    saved = saved_state(config.run.run_dir) or {}
    job = service.queue.submit({}, run_id=str(saved.get("run_id") or orchestrator.run_id))
    orchestrator.state.run_id = job.run_id  # a resumed run's id from the first registration on
    port = service.start(orchestrator)
    _serving_line(config, port, f"run {job.run_id}, dir {config.run.run_dir}")
    (config.run.run_dir / "coordinator.port").write_text(f"{port}\n")

    _stop_on(service, "stopping the run", signal.SIGTERM)
    try:
        taken = service.queue.take(timeout_s=0)
        assert taken is not None
        ended = service.run_job(taken, config, orchestrator)
    finally:
        service.close()
    if ended.state != "completed":
        log.error("run aborted: %s", ended.message or "stopped before the run completed")
        return 1
    accuracy = ended.final_accuracy
    if accuracy is not None:
        final = service.summary
        f1 = final.get("final_macro_f1")
        log.info(
            "final accuracy: %.3f%s (%s, round %d)",
            accuracy,
            f", macro-F1 {f1:.3f}" if f1 is not None else "",
            final["final_source"],
            final["final_round"],
        )
    return 0


def serve(config: CoordinatorConfig) -> int:
    """`fedpipe-coordinator serve`: stay up, run submitted runs one after another (coordinator.service)."""
    from coordinator.jobs import JobQueue
    from coordinator.service import Service

    security = _security(config)
    queue = JobQueue(config.service.state_dir)  # a queue file that cannot be read stops us before binding
    service = Service(config, security, queue)
    port = service.start()
    _serving_line(config, port, f"runs in {config.service.state_dir}")
    (config.service.state_dir / "coordinator.port").write_text(f"{port}\n")

    _stop_on(service, "stopping (a running run resumes at the next start)", signal.SIGTERM, signal.SIGINT)
    try:
        service.serve_forever()
    finally:
        service.close()
    return 0


def _stop_on(service: Service, what: str, *signals: signal.Signals) -> None:
    def stop(signum: int, frame: FrameType | None) -> None:
        log.warning("signal %d: %s", signum, what)
        # On a thread: the handler interrupts the main thread, which may hold a lock stop() takes.
        threading.Thread(target=service.stop, name="stop", daemon=True).start()

    for signum in signals:
        signal.signal(signum, stop)


@dataclass(frozen=True)
class Assembled:
    """A run's parts before anything serves: the orchestrator and the model it was built around."""

    orchestrator: Orchestrator
    base_path: str
    spec: ModelSpec


def assemble(
    config: CoordinatorConfig, planner: Planner | None = None, metrics: CoordinatorMetrics | None = None
) -> Assembled:
    """The orchestrator of a run (registry, planner, strategy, mode, held-out evaluator, metrics) from its config;
    the config's planner unless one is given (a simulation times its calls); new metrics unless given (a
    serving coordinator's runs share one registry)."""
    from common.data import DataSource
    from common.modeling import configured_model
    from coordinator.evaluation import HeldOutEvaluator
    from coordinator.metrics import CoordinatorMetrics
    from coordinator.orchestrator import Orchestrator
    from coordinator.planner import PLANNERS
    from coordinator.registry import Registry
    from coordinator.tracking import from_section

    labels = tuple(config.labels)
    # The run's model spec is the coordinator's own, from its model section: agents must match it.
    model = config.model
    base_path, spec = configured_model(model.path, model.task, labels, model.include_mlp, model.candidates)
    log.info(
        "model %s: %s %s, fingerprint %s, %d LoRA candidates",
        model.path,
        spec.model_type,
        spec.task,
        spec.fingerprint,
        len(spec.candidates),
    )
    options = plan_options(config)
    mode = build_mode(config, spec, base_path)
    evaluation = config.evaluation
    evaluator = None
    if evaluation.heldout:
        source = DataSource(
            evaluation.heldout,
            evaluation.text_column,
            evaluation.label_column,
            labels,
            spec.task,
            evaluation.prompt_column,
            evaluation.response_column,
        )
        evaluator = HeldOutEvaluator(base_path, source, evaluation.max_samples, mode)
        evaluator.examples()  # fail now, not after the first round, if the file is wrong
    orchestrator = Orchestrator(
        config,
        Registry(spec),
        planner or PLANNERS[config.planner],
        options,
        build_strategy(config),
        metrics or CoordinatorMetrics(),
        base_path,
        evaluator,
        mode,
        from_section(config.tracking, config.run.run_dir),
    )
    return Assembled(orchestrator, base_path, spec)


def build_strategy(config: CoordinatorConfig) -> Strategy:
    """The aggregation strategy, under the server optimizer the config names."""
    from coordinator.strategy import get_strategy
    from coordinator.strategy.server_opt import ServerSettings

    agg = config.aggregation
    server = None
    if agg.server_optimizer != "none":
        lr = agg.server_lr if agg.server_lr is not None else (1.0 if agg.server_optimizer == "fedavgm" else 0.01)
        server = ServerSettings(
            agg.server_optimizer, lr, agg.server_beta1, agg.server_beta2, agg.server_tau, agg.global_rank
        )
    return get_strategy(config.strategy, agg.trim_fraction, agg.global_rank, server)


def build_mode(config: CoordinatorConfig, spec: ModelSpec, base_path: str) -> Mode:
    """The training mode the config asks for."""
    if config.training.mode == "ferret":
        from coordinator.modes.ferret import BaseWeights, FerretMode

        private = config.privacy.dp.enabled or config.privacy.secure_aggregation.enabled
        weights = BaseWeights(base_path, spec)
        return FerretMode(spec, base_path, config.run.seed, config.ferret.basis, weights, even_directions=private)
    from coordinator.modes.lora import LoraMode

    # Saved adapters name an embedded base by FedPipe's name for it, which resolves on any install, rather
    # than by its path inside this machine's virtual environment (common.base_id).
    named = config.model.path if config.model.path in KNOWN_BASES else str(Path(base_path).resolve())
    return LoraMode(spec, config.lora.alpha, named)


def plan_options(config: CoordinatorConfig) -> PlanOptions:
    """Run-wide planning settings from the config."""
    from common.types import Quantization
    from coordinator.planner import PlanOptions

    return PlanOptions(
        targets=tuple(config.lora.targets),
        rank=config.lora.rank,
        alpha=config.lora.alpha,
        dropout=config.lora.dropout,
        batch_size=config.training.batch_size,
        local_epochs=config.training.local_epochs,
        max_steps=config.training.max_steps,
        learning_rate=config.training.learning_rate,
        weight_decay=config.training.weight_decay,
        max_seq_len=config.training.max_seq_len,
        quantization=Quantization(config.training.quantization),
        deadline_s=config.run.round_deadline_s,
        seed=config.run.seed,
        search=search_space(config),
        mode=config.training.mode,
        optimizer=config.training.optimizer,
        directions=config.ferret.directions,
        basis=config.ferret.basis,
        proximal_mu=config.training.proximal_mu,
        agent_ranks=dict(config.planning.agent_ranks),
        track_importance=config.selection.scores_training,
    )


def explain(argv: Sequence[str]) -> int:
    """`fedpipe-coordinator plan --explain --run-dir DIR [flags]`: re-plan from a run's saved agents."""
    from pathlib import Path

    from coordinator.config import CoordinatorConfig
    from coordinator.explain import render, replan

    args = list(argv)
    if "--explain" in args:
        args.remove("--explain")
    run_dir: Path | None = None
    if "--run-dir" in args:
        index = args.index("--run-dir")
        if index + 1 >= len(args):
            print("fedpipe-coordinator plan: --run-dir needs a folder", file=sys.stderr)
            return 2
        run_dir = Path(args[index + 1])
        del args[index : index + 2]
    if run_dir is None:
        print("usage: fedpipe-coordinator plan --explain --run-dir RUN_DIR [config flags]", file=sys.stderr)
        return 2
    if "--config" not in args and (run_dir / "config.json").is_file():
        args = ["--config", str(run_dir / "config.json"), *args]  # the run's own settings (JSON is YAML)
    try:
        config = build(CoordinatorConfig, args, "fedpipe-coordinator plan")
        planned, profiles = replan(
            config.planner, plan_options(config), run_dir, weight_ratio=config.updates.max_weight_ratio
        )
    except FedPipeError as err:
        print(f"fedpipe-coordinator plan: {err}", file=sys.stderr)
        return 2
    print(f"planner {config.planner}, {len(profiles)} agents from {run_dir}")
    print(render(planned, profiles))
    return 0


def token(argv: Sequence[str]) -> int:
    """`fedpipe-coordinator token AGENT_ID`: a new bearer token for an agent, and its line for tls.tokens."""
    import secrets

    from common.certs import check_agent_id
    from common.security import token_digest

    if len(argv) != 1:
        print("usage: fedpipe-coordinator token AGENT_ID", file=sys.stderr)
        return 2
    try:
        agent = check_agent_id(argv[0])
    except ConfigError as err:
        print(f"fedpipe-coordinator token: {err}", file=sys.stderr)
        return 2
    value = secrets.token_urlsafe(32)
    print(f"token (give to the agent, e.g. in its tls.token_file): {value}")
    print(f"tls.tokens entry (coordinator):  {agent}: {token_digest(value)}")
    return 0


def search_space(config: CoordinatorConfig) -> SearchSpace:
    """The fedpipe planner's search space from the planning section."""
    from common.types import Quantization
    from coordinator.planner import SearchSpace

    planning = config.planning
    return SearchSpace(
        ranks=tuple(planning.ranks),
        batch_sizes=tuple(planning.batch_sizes),
        quantizations=tuple(Quantization(q) for q in planning.quantizations),
        mask_fractions=tuple(planning.mask_fractions),
        max_under_training=planning.max_under_training,
        max_local_epochs=planning.max_local_epochs,
        round_time_slack=planning.round_time_slack,
        memory_headroom=planning.memory_headroom,
        bandwidth_bytes_per_s=planning.bandwidth_bytes_per_s,
        max_round_upload_bytes=planning.max_round_upload_bytes,
        rank_allocation=planning.rank_allocation,
        matrix_ranks=tuple(planning.matrix_ranks),
    )


if __name__ == "__main__":
    sys.exit(main())
