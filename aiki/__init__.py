"""Aiki: durable workflows for Python, on Trio.

A workflow is async Python calling tasks; every task result is checkpointed, so a run
survives crashes and restarts and resumes where it stopped.
"""

import importlib
from typing import Any

from aiki.actors.run import DeadlineScope, WorkflowRun
from aiki.client.views import ChildStatus
from aiki.errors import (
    AikiError,
    AuthenticationFailed,
    ChildCancelled,
    ChildFailed,
    ConfigError,
    ConnectionLost,
    ControlRefused,
    DeadlineExceeded,
    EventTimeout,
    IdempotencyConflict,
    InvalidFork,
    NonDeterminismError,
    NonRetryableError,
    PayloadError,
    RunCancelled,
    RunFinished,
    RunNotFound,
    RunNotPausable,
    RunNotPaused,
    RunNotRetryable,
    RunPaused,
    ScheduleConflict,
    ScheduleInvalid,
    ScheduleNotFound,
    StaleLease,
    TaskFailed,
    UnknownEvent,
    UnknownWorkflow,
    UnservedVersionWarning,
    WorkerIdInUse,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowUsageError,
)
from aiki.gc_tuning import tune_gc
from aiki.protocol import WorkerInfo
from aiki.records import HistoryEvent
from aiki.retry import Retry
from aiki.sdk.client import (
    Client,
    RunHandle,
    RunStatus,
    RunSummary,
    Schedule,
    ScheduleDescription,
    ScheduleOccurrence,
    ScheduleSummary,
    TaskStatus,
    WaitStatus,
)
from aiki.sdk.definitions import ChildRun, Event, Task, Workflow, event, task, workflow
from aiki.sdk.embedded import embedded, worker
from aiki.sdk.remote import connect
from aiki.sources import Sources


def __getattr__(name: str) -> Any:
    # ``aiki.asyncio`` and ``aiki.sync`` (the asyncio and blocking clients) are imported on
    # first use, so that ``import aiki`` does not load a WebSocket library it may not need.
    if name in ("asyncio", "sync"):
        return importlib.import_module(f"aiki.{name}")
    raise AttributeError(f"module 'aiki' has no attribute {name!r}")


__all__ = [
    "AikiError", "AuthenticationFailed", "ChildCancelled", "ChildFailed", "ChildRun",
    "ChildStatus", "Client", "ConfigError", "ConnectionLost", "ControlRefused",
    "DeadlineExceeded", "DeadlineScope", "Event", "EventTimeout", "HistoryEvent",
    "IdempotencyConflict", "InvalidFork", "NonDeterminismError", "NonRetryableError",
    "PayloadError", "Retry", "RunCancelled", "RunFinished", "RunHandle", "RunNotFound",
    "RunNotPausable", "RunNotPaused", "RunNotRetryable", "RunPaused", "RunStatus",
    "RunSummary", "Schedule", "ScheduleConflict", "ScheduleDescription", "ScheduleInvalid",
    "ScheduleNotFound", "ScheduleOccurrence", "ScheduleSummary", "Sources", "StaleLease",
    "Task", "TaskFailed", "TaskStatus", "UnknownEvent", "UnknownWorkflow",
    "UnservedVersionWarning", "WaitStatus", "WorkerIdInUse", "WorkerInfo", "Workflow",
    "WorkflowCancelled", "WorkflowFailed", "WorkflowRun", "WorkflowUsageError", "connect",
    "embedded", "event", "task", "tune_gc", "worker", "workflow",
]
