"""The one error hierarchy of Aiki: everything raised on purpose derives from AikiError."""

from __future__ import annotations


class AikiError(Exception):
    """Base class of every error Aiki raises on purpose."""


class UnknownWorkflow(AikiError):
    """A workflow name (or name and version) that nobody registered."""


class PayloadError(AikiError, TypeError):
    """A payload or result that cannot be encoded to JSON, or decoded into its annotated type.

    It is a TypeError too, so ``except TypeError`` at a call site catches it.
    """


class ProtocolError(AikiError):
    """A message that is malformed, of an unknown type, or arrives where it makes no sense."""


class StaleLease(AikiError):
    """A write carried a lease epoch that is no longer the run's current one (fencing).

    The run was given to another worker (the lease expired, or the run was released). The
    write was rejected and nothing was stored.
    """


class StepConflict(AikiError):
    """A step result was written for a position that already holds a different final result."""


class StoreUnavailable(AikiError):
    """The store could not be reached or failed; the operation may be retried."""


class NonRetryableError(AikiError):
    """Raise this from a task to fail it at once, without further attempts."""


class NonDeterminismError(AikiError):
    """Workflow code diverged from the history recorded by an earlier attempt of the run.

    The message names both sides: what the history recorded, and what the code did now.
    """


class TaskFailed(AikiError):
    """A task failed for good (retries exhausted or non-retryable), seen from workflow code.

    Workflow code may catch it; if it does not, the run fails with the task's error.
    """

    def __init__(self, task_name: str, error_type: str, message: str, attempts: int,
                 remote_traceback: str | None = None) -> None:
        super().__init__(
            f"task {task_name!r} failed after {attempts} attempt(s): {error_type}: {message}"
        )
        self.task_name = task_name
        self.error_type = error_type
        self.message = message
        self.attempts = attempts
        self.remote_traceback = remote_traceback  # the last attempt's, as the worker saw it


class WorkflowFailed(AikiError):
    """The run ended in ``failed`` (or ``cancelled``); carries the remote error type and message."""

    def __init__(self, run_id: str, error_type: str, message: str,
                 remote_traceback: str | None = None) -> None:
        super().__init__(f"run {run_id} failed: {error_type}: {message}")
        self.run_id = run_id
        self.error_type = error_type
        self.message = message
        self.remote_traceback = remote_traceback  # where it failed, as the worker saw it


class WorkflowCancelled(WorkflowFailed):
    """The run ended ``cancelled`` (``handle.cancel``); ``reason`` is the one given, if any.

    A :class:`WorkflowFailed` too, so ``except aiki.WorkflowFailed`` still sees every run
    that did not complete.
    """

    def __init__(self, run_id: str, reason: str | None) -> None:
        AikiError.__init__(self, f"run {run_id} was cancelled"
                           + (f": {reason}" if reason else ""))
        self.run_id = run_id
        self.error_type = "RunCancelled"
        self.message = reason or ""
        self.reason = reason
        self.remote_traceback = None


class RunCancelled(AikiError):
    """Raised in workflow code, at the await where it stands, once its run is cancelled.

    Like Trio's cancellation it is level-triggered: caught and ignored, it is raised again
    at the next await. Inside ``with run.shield():`` awaits run normally, so that workflow
    code can call compensation tasks; they must end within the cancel's grace period, then
    the run ends ``cancelled`` whatever the code does.
    """

    def __init__(self, run_id: str, reason: str | None) -> None:
        super().__init__(f"run {run_id} was cancelled" + (f": {reason}" if reason else ""))
        self.run_id = run_id
        self.reason = reason


class ChildFailed(AikiError):
    """Raised in a parent workflow by ``await child.result()`` when the child run failed:
    its id, error type and message."""

    def __init__(self, child_id: str, error_type: str, message: str) -> None:
        super().__init__(f"child run {child_id} failed: {error_type}: {message}")
        self.child_id = child_id
        self.error_type = error_type
        self.message = message


class ChildCancelled(AikiError):
    """Raised in a parent workflow by ``await child.result()`` when the child run was
    cancelled, with the cancel's reason."""

    def __init__(self, child_id: str, reason: str | None) -> None:
        super().__init__(f"child run {child_id} was cancelled"
                         + (f": {reason}" if reason else ""))
        self.child_id = child_id
        self.reason = reason


class DeadlineExceeded(AikiError):
    """Raised at the end of ``with run.fail_after(...)`` when its deadline passed first."""


class WorkflowUsageError(AikiError, RuntimeError):
    """A workflow-only API used where it cannot work: ``start_child``, a deadline scope
    (``run.move_on_after`` / ``run.fail_after``) or ``run.shield()`` outside the workflow
    code of its run (a ``WorkflowRun`` kept after the run, or handed to another task); a
    deadline scope entered twice; ``run.client`` on a worker started without a client.
    (A RuntimeError too, as these were before.)"""


class RunNotFound(AikiError):
    """No run with this id exists in the store."""


class IdempotencyConflict(AikiError):
    """An enqueue with an idempotency key that names an existing run of another payload.

    Nothing was stored. Pass ``on_conflict="return_existing"`` to get the existing run
    instead (the same key with the same payload always returns it).
    """


class ControlRefused(AikiError):
    """A run control (pause, resume, retry, fork) asked of a run in a state where it makes no
    sense. Nothing changed."""


class RunNotRetryable(ControlRefused):
    """A retry of a run that has not failed (it is queued, running, waiting or completed)."""


class RunNotPausable(ControlRefused):
    """A pause of a run that has finished, or is paused already."""


class RunNotPaused(ControlRefused):
    """A resume of a run that is not paused."""


class InvalidFork(ControlRefused, ValueError):
    """A fork whose ``from_step`` is negative, past the end of the run's history, or takes
    in a step that has not finished. Nothing was stored."""


class RunPaused(StaleLease):
    """A worker's write refused because its run is paused: no new step starts (and the run
    does not end) until it is resumed. The worker gives the run back at this step boundary."""


class RunFinished(AikiError):
    """The run has ended (completed, failed or cancelled): it takes no more events."""


class UnknownEvent(AikiError):
    """An event that the run's workflow version does not declare (``events=[...]``)."""


class EventTimeout(AikiError):
    """Raised in workflow code by ``event.wait(run, timeout=...)`` when no event came in time.

    A send that arrives later goes to the next wait for that event.
    """


class ConnectionLost(AikiError):
    """The connection to the server (or peer) closed."""


class AuthenticationFailed(ConnectionLost):
    """The server refused the connection's token (missing or wrong). Retrying will not help:
    give the server's token (``--token-file``, ``AIKI_TOKEN`` or ``token=``)."""


class WorkerIdInUse(ConnectionLost):
    """The server refused a worker id that a live session holds (another process was given
    the same ``--id``), or took it over from this one after it fell silent. Retrying will not
    help: give each worker its own id."""


class ConfigError(AikiError, ValueError):
    """A server, worker or client setting that cannot work, with what to change."""


class ScheduleInvalid(AikiError, ValueError):
    """A schedule definition that cannot work (a bad cron field, an unknown time zone, an
    interval not above zero, ...): refused at definition, with nothing stored."""


class ScheduleConflict(AikiError):
    """A schedule id that exists with another definition. Nothing was changed: pass
    ``update=True`` to replace the definition, or pick another id."""


class ScheduleNotFound(AikiError):
    """No schedule with this id exists."""


class UnservedVersionWarning(UserWarning):
    """A schedule (or run) names a workflow version that no connected worker has registered:
    its runs will wait in the queue until a worker that has it connects."""
