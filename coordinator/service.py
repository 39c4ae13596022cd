"""A coordinator's runs as jobs: one server for agents and admins, and the runs it serves one after another.

`fedpipe-coordinator serve` stays up: runs submitted through the admin API queue (coordinator.jobs) and
run in order, each in its own directory, while agents with `after_finish: next-run` stay connected and
join each next run. The one-shot `fedpipe-coordinator --config run.yaml` is the same service with one run
that exits when it ends. A run's settings are the serving coordinator's config (its defaults) overlaid with
what was submitted, less what the service owns for every run (SERVICE_KEYS and run.run_dir).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pydantic import ValidationError

from common import logs
from common.errors import ConfigError, FedPipeError, InvalidArgument
from common.security import ServerSecurity
from common.settings import describe, merge
from coordinator.config import SERVICE_KEYS, CoordinatorConfig
from coordinator.jobs import Job, JobQueue, State
from coordinator.metrics import CoordinatorMetrics
from coordinator.round_state import Phase, RunAborted

if TYPE_CHECKING:
    from coordinator.orchestrator import Orchestrator
    from coordinator.server import Serving

log = logging.getLogger("fedpipe.coordinator")
RUN_LOG = "coordinator.log"
MAX_STARTS = 5  # a run resumed this often without ending is failed (a crash loop would hold the queue)


def run_config(defaults: CoordinatorConfig, submitted: Mapping[str, Any], run_dir: Path) -> CoordinatorConfig:
    """A submitted run's settings over the service's; ConfigError names what the submission may not set
    or what is wrong in it."""
    owned = [key for key in SERVICE_KEYS if key in submitted]
    if owned:
        raise ConfigError(f"{owned[0]}: the serving coordinator sets it for every run; a submitted run may not")
    run = submitted.get("run", {})
    if not isinstance(run, Mapping):
        raise ConfigError(f"run: must be a mapping (got {run!r})")
    if "run_dir" in run:
        raise ConfigError("run.run_dir: the serving coordinator gives each run its own (service.state_dir/runs/<id>)")
    merged = merge(defaults.model_dump(mode="json"), submitted)
    merged["run"]["run_dir"] = str(run_dir)
    try:
        return CoordinatorConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(describe(err)) from None


def _check_paths(config: CoordinatorConfig) -> None:
    """What a run reads on this host exists (its base's config, its held-out file), so a typo is refused at
    submission rather than found when the run's turn comes, hours later."""
    from common.modeling import configured_model

    model = config.model
    try:
        configured_model(model.path, model.task, config.labels, model.include_mlp, model.candidates)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path: {model.path}: {err}") from None
    heldout = config.evaluation.heldout
    if heldout and heldout != "embedded" and not Path(heldout).is_file():
        raise ConfigError(f"evaluation.heldout: {heldout} does not exist on the coordinator's host")


@contextmanager
def run_log(path: Path, fmt: str) -> Iterator[None]:
    """Every log line of the process while a run runs also goes to the run's coordinator.log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logs.formatter("coordinator", fmt))
    handler.addFilter(logs.EscapeControl())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


@dataclass(frozen=True)
class Progress:
    """What a running run has done so far."""

    round: int
    rounds: int
    agents: int


class Service:
    """The runs of one coordinator process and the server they share (module docstring)."""

    def __init__(self, config: CoordinatorConfig, security: ServerSecurity, queue: JobQueue) -> None:
        self.config = config
        self.security = security
        self.queue = queue
        self.metrics = CoordinatorMetrics()
        self.serving: Serving | None = None
        self.lock = threading.Lock()
        self.active: tuple[str, Orchestrator] | None = None
        self.stopping = threading.Event()
        self.single = False  # one-shot: nothing may be submitted
        self.summary: dict[str, Any] = {}  # the last completed run's summary (the one-shot's final line)

    # ------------------------------------------------------------------ serving

    def start(self, orchestrator: Orchestrator | None = None) -> int:
        """Bind the server (agents' calls to orchestrator's run, if given) and the metrics; returns the port."""
        from common.metrics import serve
        from coordinator.admin import AdminServicer
        from coordinator.server import start_server

        config = self.config
        admission = orchestrator.admission if orchestrator is not None else None
        # gRPC binds first: its port is fixed (agents know it), the metrics port may be 0, and the OS
        # could hand an ephemeral metrics port the very number gRPC was about to take.
        serving = start_server(
            admission, config.server, self.metrics, self.security, AdminServicer(self, self.security)
        )
        if config.metrics.port >= 0:
            try:
                metrics_port = serve(self.metrics.registry, config.metrics.host, config.metrics.port)
            except OSError:
                serving.stop(grace_s=0)
                raise
            log.info("metrics on http://%s:%d/metrics", config.metrics.host, metrics_port)
        self.serving = serving
        self._count()
        return serving.port

    def close(self) -> None:
        """Stop serving (in-flight calls get 2 s)."""
        if self.serving is not None:
            self.serving.stop(grace_s=2)

    def stop(self) -> None:
        """A signal: end the running run at its next wait (it stays `running` on disk and resumes on the next
        start) and take no other. Call it from a thread, not a signal handler: it takes locks the main thread
        may hold."""
        self.stopping.set()
        self.queue.close()
        with self.lock:
            if self.active is not None:
                self.active[1].stop()

    def serve_forever(self) -> None:
        """Run the queued runs one after another until stop()."""
        queued = sum(1 for j in self.queue.all() if j.state in ("queued", "running"))
        log.info("serving runs from %s (%d waiting)", self.queue.state_dir, queued)
        while not self.stopping.is_set():
            job = self.queue.take()
            if job is None:
                break
            if job.starts > MAX_STARTS:  # it took the coordinator down each time: let the queue behind it go on
                log.error("run %s: started %d times without ending; failing it", job.run_id, job.starts - 1)
                self._end(job, "failed", f"started {job.starts - 1} times without ending (the coordinator stopped)")
                continue
            try:  # checked at submission; the service's own config may have changed since
                config = run_config(self.config, job.settings, self.queue.run_dir(job.run_id))
            except ConfigError as err:
                log.error("run %s: %s", job.run_id, err)
                self._end(job, "failed", str(err))
                continue
            self.run_job(job, config)

    # ------------------------------------------------------------------ what admins ask (coordinator.admin)

    def submit(self, text: str, name: str) -> Job:
        """Check a run's YAML and queue it; InvalidArgument (nothing queued) names what is wrong."""
        import yaml

        if self.single:
            raise InvalidArgument("config_yaml", "this coordinator runs one run; start `fedpipe-coordinator serve`")
        try:
            settings = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise InvalidArgument("config_yaml", f"not YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(settings, dict):
            raise InvalidArgument("config_yaml", "must hold a mapping at the top level")
        try:
            _check_paths(run_config(self.config, settings, self.queue.run_dir("check")))
        except ConfigError as err:
            raise InvalidArgument("config_yaml", str(err)) from None
        job = self.queue.submit(settings, name)
        log.info(
            "run %s%s queued (position %d)", job.run_id, f" ({name})" if name else "", self.queue.position(job.run_id)
        )
        self._count()
        return job

    def cancel(self, run_id: str) -> Job:
        """Cancel a queued run, or stop a running one at its next wait."""
        job = self.queue.cancel(run_id)
        with self.lock:
            if self.active is not None and self.active[0] == job.run_id:
                self.active[1].stop()
        self._count()
        return job

    def progress(self, job: Job) -> Progress | None:
        """A running run's round, rounds and registered agents; None for one not running here."""
        with self.lock:
            if self.active is None or self.active[0] != job.run_id:
                return None
            orchestrator = self.active[1]
        global_ = orchestrator.state.global_
        return Progress(
            global_.round if global_ else 0, orchestrator.config.run.rounds, len(orchestrator.registry.all())
        )

    def log_path(self, job: Job) -> Path:
        """The run's coordinator.log."""
        return self.run_dir(job) / RUN_LOG

    def run_dir(self, job: Job) -> Path:
        """The run's directory."""
        return self.config.run.run_dir if self.single else self.queue.run_dir(job.run_id)

    # ------------------------------------------------------------------ one run

    def run_job(self, job: Job, config: CoordinatorConfig, orchestrator: Orchestrator | None = None) -> Job:
        """Run one job to its end (or until stop()); its outcome is recorded in the queue."""
        from coordinator.cli import assemble

        with run_log(self.run_dir(job) / RUN_LOG, self.config.log_format):
            log.info(
                "run %s%s starts (start %d) in %s",
                job.run_id,
                f" ({job.name})" if job.name else "",
                job.starts,
                config.run.run_dir,
            )
            try:
                if orchestrator is None:
                    orchestrator = assemble(config, metrics=self.metrics).orchestrator
                    orchestrator.state.run_id = job.run_id
                with self.lock:
                    self.active = (job.run_id, orchestrator)
                if self.queue.get(job.run_id).cancel_requested or self.stopping.is_set():
                    orchestrator.stop()  # asked while the run was being built
                if self.serving is not None:
                    self.serving.servicer.attach(orchestrator.admission)
                self.metrics.begin_run(job.run_id)
                summary = orchestrator.run()
            except RunAborted as err:
                return self._aborted(job, orchestrator, str(err))
            except Exception as err:  # the service outlives a run's failure, a bug included (logged with its trace)
                internal = not isinstance(err, FedPipeError)
                if not self.single:  # the one-shot's caller logs it
                    log.error("run %s failed: %s", job.run_id, err, exc_info=err if internal else None)
                why = "see the coordinator log" if internal else str(err)
                self._end_for_agents(orchestrator, f"the run failed: {why}", "FAILED")
                message = f"internal error: {type(err).__name__}: {err}" if internal else str(err)
                ended = self._end(job, "failed", message)
                if self.single:
                    raise  # the one-shot coordinator exits with the error's code
                return ended
            finally:
                with self.lock:
                    self.active = None
                if self.serving is not None and not self.single:
                    # Between runs agents hear "no run" (and wait) rather than re-join the run that ended.
                    self.serving.servicer.detach()
            self.summary = summary
            accuracy = summary.get("final_accuracy")
            outcome = f"{summary['final_round']} rounds" + (
                f", final accuracy {accuracy:.3f}" if accuracy is not None else ""
            )
            log.info("run %s completed: %s", job.run_id, outcome)
            return self._end(job, "completed", outcome, accuracy)

    def _aborted(self, job: Job, orchestrator: Orchestrator | None, why: str) -> Job:
        if self.queue.get(job.run_id).cancel_requested:
            log.warning("run %s cancelled", job.run_id)
            self._end_for_agents(orchestrator, "the run was cancelled by an admin", "KILLED")
            return self._end(job, "cancelled", "cancelled by an admin")
        if self.stopping.is_set():
            log.warning("run %s interrupted (%s); the coordinator's next start resumes it", job.run_id, why)
            return self.queue.get(job.run_id)  # still running on disk
        log.error("run %s aborted: %s", job.run_id, why)
        self._end_for_agents(orchestrator, f"the run was aborted: {why}", "FAILED")
        return self._end(job, "failed", why)

    def _end(self, job: Job, state: State, message: str, accuracy: float | None = None) -> Job:
        ended = self.queue.end(job.run_id, state, message, accuracy)
        self._count()
        return ended

    @staticmethod
    def _end_for_agents(orchestrator: Orchestrator | None, message: str, status: str) -> None:
        """Agents polling a run that ended without finishing hear FINISHED with why (and, with after_finish
        next-run, wait for the next run); its trackers are closed with status (FAILED, KILLED)."""
        if orchestrator is None:
            return
        orchestrator.tracking.abort(status)
        state = orchestrator.state
        with state.cond:
            state.phase = Phase.FINISHED
            state.end_message = message
            state.notify()

    def _count(self) -> None:
        jobs = self.queue.all()
        for state in get_args(State):
            self.metrics.runs.labels(state).set(sum(1 for j in jobs if j.state == state))
