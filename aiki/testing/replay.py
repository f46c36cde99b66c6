"""Replay a run's recorded history against workflow code, running no task: the check that a
new version of the code still matches the runs it will take over.

The exported format (``aiki runs export ID``) is JSON, stable and versioned::

    {"format": "aiki.run/1", "run": {...}, "steps": [{...}, ...], "history": [{...}, ...]}

``run``, each step and each history event hold the fields of :class:`aiki.records.RunRecord`,
:class:`~aiki.records.StepRecord` and :class:`~aiki.records.HistoryEvent` (times in epoch
seconds, payloads and results as JSON text). Fields added later are optional; a reader
ignores none and refuses a format it does not know.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import cattrs

from aiki import protocol as p
from aiki.actors.run import RunState, WorkflowDefinition, position_key, run_workflow
from aiki.errors import NonDeterminismError
from aiki.records import TERMINAL_RUN_STATES, HistoryEvent, RunRecord, StepRecord
from aiki.sources import Sources

FORMAT = "aiki.run/1"
_converter = cattrs.Converter()


def export(run: RunRecord, steps: tuple[StepRecord, ...],
           history: tuple[HistoryEvent, ...]) -> dict[str, Any]:
    """A run as the exported JSON object (see the module docstring)."""
    return {"format": FORMAT, "run": _converter.unstructure(run),
            "steps": [_converter.unstructure(s) for s in steps],
            "history": [_converter.unstructure(e) for e in history]}


@attrs.frozen
class Exported:
    run: RunRecord
    steps: tuple[StepRecord, ...]
    history: tuple[HistoryEvent, ...]


def load(source: dict[str, Any] | str | Path) -> Exported:
    """An exported run from its JSON object, JSON text, or a file's path."""
    if isinstance(source, Path):
        source = source.read_text()
    data = json.loads(source) if isinstance(source, str) else source
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"not an exported Aiki run (format {FORMAT!r}), got {found!r}")
    try:
        return Exported(
            _converter.structure(data["run"], RunRecord),
            tuple(_converter.structure(s, StepRecord) for s in data["steps"]),
            tuple(_converter.structure(e, HistoryEvent) for e in data.get("history", [])),
        )
    except (KeyError, TypeError, ValueError, cattrs.BaseValidationError) as exc:
        raise ValueError(f"malformed exported run: {exc}") from exc


@attrs.frozen
class ReplayResult:
    """How a replay went. ``outcome``: ``completed`` or ``failed`` (the code ended as the run
    did, or would), or ``in progress`` (it reached the end of the history: the run goes on
    from there). ``steps``: how many recorded steps the code consumed."""

    run_id: str
    outcome: str
    steps: int
    detail: str = ""


class _EndOfHistory(BaseException):
    """The code asked for something the history does not hold: the run goes on from here."""


async def replay(workflow: WorkflowDefinition,
                 history: Exported | dict[str, Any] | str | Path) -> ReplayResult:
    """Replay an exported run (see :func:`load`) against ``workflow``, running no task.

    Raises :class:`aiki.NonDeterminismError`, naming the step and both sides, if the code no
    longer matches what the run recorded; returns a :class:`ReplayResult` otherwise. Call it
    in a Trio task (a test, or ``trio.run``).
    """
    exported = history if isinstance(history, Exported) else load(history)
    run = attrs.evolve(exported.run, lease_owner="replay", state="running")
    recorded = {s.position: s for s in exported.steps}
    ended: list[Any] = []

    async def persist(make: Any) -> Any:
        msg = make(0)
        if isinstance(msg, (p.CompleteRun, p.FailRun, p.WaitRun, p.ReleaseRun)):
            ended.append(msg)
            return p.Ok(0)
        if isinstance(msg, p.AwaitStep) and msg.step.position in recorded:
            return p.StepResult(0, recorded[msg.step.position])  # a wait still open
        step = getattr(msg, "step", None)
        raise _EndOfHistory(f"a new {type(msg).__name__} at step {step.position} "
                            f"({step.kind} {step.name!r})" if step is not None
                            else type(msg).__name__)

    beyond: list[BaseException] = []
    states: list[RunState] = []
    try:
        await run_workflow(workflow, p.Assign(run, exported.steps), persist, Sources.seeded(0),
                           inline_retry_max=0.0, on_state=states.append)
    except* _EndOfHistory as group:  # (from inside a run.gather, it comes in a group)
        beyond.extend(group.exceptions)
    if beyond:
        wanted = str(beyond[0])
        left = sorted(set(recorded) - states[0].consumed, key=position_key)
        if exported.run.state in TERMINAL_RUN_STATES or left:
            has = (f"recorded steps it never reached ({', '.join(left[:5])})" if left
                   else f"the run {exported.run.state} without it")
            raise NonDeterminismError(
                f"run {run.id} diverged from its history: the code now calls {wanted}, "
                f"but the history has {has}")
        return ReplayResult(run.id, "in progress", len(recorded),
                            f"the history ends where the code asks for {wanted}")
    [last] = ended or [None]
    if isinstance(last, p.FailRun):
        if last.error_type == "NonDeterminismError":
            raise NonDeterminismError(last.error_message)
        return ReplayResult(run.id, "failed", len(recorded),
                            f"{last.error_type}: {last.error_message}")
    if isinstance(last, p.CompleteRun):
        return ReplayResult(run.id, "completed", len(recorded))
    return ReplayResult(run.id, "in progress", len(recorded), "the run waits here")
