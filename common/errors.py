"""One exception hierarchy for FedPipe; the transport edge maps each class to one gRPC status."""

from __future__ import annotations


class FedPipeError(Exception):
    """Base of every error FedPipe raises on purpose."""


class ConfigError(FedPipeError):
    """A configuration value is missing or wrong; the message names the field."""


class InvalidArgument(FedPipeError):
    """A request is malformed; `field` names what was wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class IntegrityError(InvalidArgument):
    """A payload does not match its declared size or checksum."""


class UnknownAgent(FedPipeError):
    """The agent id is not registered (or the coordinator forgot it); register again."""


class UnknownRun(FedPipeError):
    """No run of a serving coordinator has that id."""


class StaleRound(FedPipeError):
    """An upload or download names a round that is not the open one."""


class AlreadyUploaded(FedPipeError):
    """This agent's update for this round was already accepted."""


class ModelMismatch(FedPipeError):
    """An agent's base model or labels differ from the run's."""


class NotReady(FedPipeError):
    """The coordinator cannot answer this yet (no global adapter, no open round)."""


class ResourceExhausted(FedPipeError):
    """A payload is larger than the configured limit."""


class ServerUnavailable(FedPipeError):
    """The coordinator could not be reached after all retries."""


class Stopped(FedPipeError):
    """The process was asked to stop (a signal) while it waited to reach the coordinator."""


class Unauthenticated(FedPipeError):
    """A call carries no valid credentials."""


class PermissionDenied(FedPipeError):
    """An authenticated agent tried to act as another agent."""


class Rejected(FedPipeError):
    """The coordinator refused a call for a reason other than transport trouble; `status` is its gRPC code name."""

    def __init__(self, status: str, details: str) -> None:
        super().__init__(f"{status}: {details}")
        self.status = status
        self.details = details
