"""Aiki: durable workflows for Python, on Trio.

A workflow is async Python calling tasks; every task result is checkpointed, so a run
survives crashes and restarts and resumes where it stopped.
"""

import importlib
from typing import Any

from aiki.actors.run import WorkflowRun
from aiki.errors import (
    AikiError,
    AuthenticationFailed,
    ConfigError,
    ConnectionLost,
    ControlRefused,
    EventTimeout,
    IdempotencyConflict,
    InvalidFork,
    NonDeterminismError,
    NonRetryableError,
    PayloadError,
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
    WorkflowFailed,
)
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
from aiki.sdk.definitions import Event, Task, Workflow, event, task, workflow
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
    "AikiError", "AuthenticationFailed", "Client", "ConfigError", "ConnectionLost",
    "ControlRefused", "Event", "EventTimeout", "HistoryEvent", "IdempotencyConflict",
    "InvalidFork", "NonDeterminismError", "NonRetryableError", "PayloadError", "Retry",
    "RunFinished", "RunHandle", "RunNotFound", "RunNotPausable", "RunNotPaused",
    "RunNotRetryable", "RunPaused", "RunStatus", "RunSummary", "Schedule", "ScheduleConflict",
    "ScheduleDescription", "ScheduleInvalid", "ScheduleNotFound", "ScheduleOccurrence",
    "ScheduleSummary", "Sources", "StaleLease", "Task", "TaskFailed", "TaskStatus",
    "UnknownEvent", "UnknownWorkflow", "UnservedVersionWarning", "WaitStatus",
    "WorkerIdInUse", "WorkerInfo", "Workflow", "WorkflowFailed", "WorkflowRun", "connect",
    "embedded", "event", "task", "worker", "workflow",
]
