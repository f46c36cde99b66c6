"""Random workflows from a seeded grammar, interpreted by one generic workflow definition.

A *program* (part of the run's payload) is a list of steps; each step calls one task or a
``run.gather`` of several, sleeps (short: held on the worker; long: the slot is given back),
or waits for an event. Tasks differ by retry policy; a step may fail transiently (fewer
times than its policy allows, so the fault-free run succeeds too), fail permanently, reuse an
idempotency key, or catch the failure. Each task execution is recorded by the simulated
service in the ledger, so the checkers can see every external effect.

What a run's result depends on is kept deterministic, so the fault-free run of the same seed
gives a comparable one: an ``ev`` wait folds in the value of the k-th ``ev`` send, and its
sender sends them one after another, each retried under its key until acknowledged; a
``race`` wait (a timeout raced by a send aimed at its due time) and a sleep (which a client's
wake-up may end early) add only a marker, which the checkers read against the store.

Each run also has *client actions*, made by clients attached to any server: its ``ev``
sends (sometimes a duplicate under a used key), a send aimed at a ``race`` wait's timeout,
wake-ups at random moments, a watch for its end, and then a send to the finished run; and
*controls* (drawn from a stream of their own): pauses at random moments, each resumed a
while later, a retry once the run has failed, a fork from a random step once it has ended.
"""

from __future__ import annotations

import contextvars
import random
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

import aiki
from simulations.store import Ledger

_LEDGER: list[Ledger] = []  # the world currently running (one per process at a time)
# The worker whose task is running: set by each worker node, inherited by its Trio tasks.
NODE: contextvars.ContextVar[str] = contextvars.ContextVar("sim_node", default="?")
_CALLS: dict[tuple[str, str], int] = {}

RETRIES: dict[str, aiki.Retry] = {
    "t-none": aiki.Retry.none(),
    "t-fixed": aiki.Retry.fixed(3, 0.5),
    "t-exp": aiki.Retry.exponential(4, 0.2, max_delay=2.0),
    "t-jit": aiki.Retry.jittered(4, 0.2, max_delay=2.0),
    "t-long": aiki.Retry.fixed(2, 30.0),  # longer than inline_retry_max: the run sleeps
}


_CLOCKS: dict[str, Any] = {}  # node -> its wall clock (``now()``), for the deadline checks


def bind(ledger: Ledger, clocks: dict[str, Any] | None = None) -> None:
    _LEDGER[:] = [ledger]
    _CALLS.clear()
    _CLOCKS.clear()
    _CLOCKS.update(clocks or {})


def _lease() -> tuple[str, int] | None:
    """The run and lease epoch the task body runs under (the engine's Run actor's)."""
    from aiki.actors.run import _BRANCH

    branch = _BRANCH.get(None)
    return None if branch is None else (branch[0].lease.run_id, branch[0].lease.epoch)


def label_of(spec: dict[str, Any]) -> str:
    """A call's label, and its iteration in a loop: what tells its executions apart."""
    return spec["label"] if "i" not in spec else f"{spec['label']}#{spec['i']}"


def _make_task(name: str, retry: aiki.Retry) -> aiki.Task[dict[str, Any], int]:
    async def body(spec: dict[str, Any]) -> int:
        key = (spec["rk"], spec["label"])
        _CALLS[key] = _CALLS.get(key, 0) + 1
        lease = None
        if _LEDGER:
            _LEDGER[0].executions.append(
                (trio.current_time(), spec["rk"], label_of(spec), name, NODE.get()))
            lease = _lease()
        try:
            await trio.sleep(spec["work"])
        finally:
            if lease is not None:
                _LEDGER[0].body_ended(*lease, trio.current_time())
        fail = spec["fail"]
        if fail == -1:
            raise aiki.NonRetryableError(f"{spec['label']} is refused for good")
        if fail == -2:
            raise RuntimeError(f"{spec['label']} always breaks")
        if _CALLS[key] <= fail:
            raise ConnectionError(f"{spec['label']} transient failure {_CALLS[key]}")
        return (spec["x"] * 31 + zlib.crc32(spec["label"].encode())) % 1_000_003

    body.__name__ = name.replace("-", "_")
    return aiki.task(name=name, retry=retry)(body)


TASKS = {name: _make_task(name, retry) for name, retry in RETRIES.items()}
# The compensation a cancelled run calls inside ``run.shield()`` (apart from RETRIES, whose
# draws the task steps make: adding it there would change every seed's workload).
COMPENSATION = "t-comp"
TASKS[COMPENSATION] = _make_task(COMPENSATION, aiki.Retry.fixed(3, 0.2))
# Work done inside ``run.shield()`` within a deadline scope (not a compensation: it may run
# before any cancel, and after one, since a shield holds off RunCancelled too).
SHIELDED = "t-shield"
TASKS[SHIELDED] = _make_task(SHIELDED, aiki.Retry.fixed(3, 0.2))
# ``ev``: every wait gets a value that its result folds in; ``race``: waits with a timeout
# that a send is aimed at. Payloads are {"id": send id, "v": value}: each send unique.
EV = aiki.event("ev", dict)
RACE = aiki.event("race", dict)
SHORT_SLEEPS = (0.5, 2.0, 6.0)  # under the workers' inline limit (10 s): held on the worker
LONG_SLEEPS = (15.0, 40.0, 90.0)  # the run waits, the worker's slot is free


@attrs.define(eq=False)
class Ctx:
    """What a program's steps share while it runs: the run, the accumulator that each task
    result feeds (so later steps depend on earlier results), and the output list."""

    run: aiki.WorkflowRun
    rk: str
    acc: int
    out: list[int] = attrs.field(factory=list)

    async def call(self, s: dict[str, Any], **extra: Any) -> int:
        """Call the task ``s`` names with the current accumulator (and ``extra``) as input;
        a caught failure gives -1."""
        try:
            return await TASKS[s["task"]].run(self.run, {**s, "x": self.acc, "rk": self.rk,
                                                         **extra},
                                              idempotency_key=s.get("key"))
        except aiki.TaskFailed:
            if not s.get("catch"):
                raise
            return -1


# The grammar: a step is a dict whose kind is its first key found here. A new kind (children,
# cancellation, controls, schedules) is one function registered under its key.
StepFn = Callable[[Ctx, dict[str, Any]], Awaitable[None]]
STEP_KINDS: dict[str, StepFn] = {}


def step_kind(key: str) -> Callable[[StepFn], StepFn]:
    def register(fn: StepFn) -> StepFn:
        STEP_KINDS[key] = fn
        return fn

    return register


@step_kind("call")
async def _call_step(ctx: Ctx, step: dict[str, Any]) -> None:
    ctx.acc = await ctx.call(step["call"])
    ctx.out.append(ctx.acc)


@step_kind("gather")
async def _gather_step(ctx: Ctx, step: dict[str, Any]) -> None:
    values = await ctx.run.gather(*[
        TASKS[s["task"]].run(ctx.run, {**s, "x": ctx.acc, "rk": ctx.rk},
                             idempotency_key=s.get("key"))
        for s in step["gather"]
    ])
    ctx.acc = sum(values) % 1_000_003
    ctx.out.append(ctx.acc)


@step_kind("repeat")
async def _repeat_step(ctx: Ctx, step: dict[str, Any]) -> None:
    # The same task with the same input, several times in a row (polling a status, sending
    # the same notice twice): one content address at several positions of the run.
    values = [await ctx.call(step["repeat"]) for _ in range(step["times"])]
    ctx.acc = sum(values) % 1_000_003
    ctx.out.append(ctx.acc)  # (one output per step: the checkers find a sleep's by index)


@step_kind("loop")
async def _loop_step(ctx: Ctx, step: dict[str, Any]) -> None:
    # Iterations until a result says stop (divisible by ``until``), at most ``max``.
    loop = step["loop"]
    for i in range(loop["max"]):
        ctx.acc = await ctx.call(loop["call"], i=i)
        if ctx.acc % loop["until"] == 0:
            break
    ctx.out.append(ctx.acc)


@step_kind("branch")
async def _branch_step(ctx: Ctx, step: dict[str, Any]) -> None:
    # Which task runs depends on the result so far.
    cases = step["branch"]
    ctx.acc = await ctx.call(cases[ctx.acc % len(cases)])
    ctx.out.append(ctx.acc)


@step_kind("helper")
async def _helper_step(ctx: Ctx, step: dict[str, Any]) -> None:
    # run.now() / run.random() / run.uuid4(), recorded once; the next task's input carries
    # it (so a replay that returned another value would diverge), its result does not.
    kind = step["helper"]
    value: Any = (await ctx.run.now() if kind == "now" else
                  await ctx.run.random() if kind == "random" else await ctx.run.uuid4())
    ctx.acc = await ctx.call(step["then"], h=value)
    ctx.out.append(ctx.acc)


@step_kind("sleep")
async def _sleep_step(ctx: Ctx, step: dict[str, Any]) -> None:
    ctx.out.append(1 if await ctx.run.sleep(step["sleep"]) else 0)  # acc: unchanged


@step_kind("event")
async def _event_step(ctx: Ctx, step: dict[str, Any]) -> None:
    got = await EV.wait(ctx.run, timeout=step["timeout"])
    ctx.acc = (ctx.acc * 7 + int(got["v"])) % 1_000_003
    ctx.out.append(ctx.acc)


@step_kind("race")
async def _race_step(ctx: Ctx, step: dict[str, Any]) -> None:
    try:
        await RACE.wait(ctx.run, timeout=step["race"])
    except aiki.EventTimeout:
        pass
    ctx.out.append(0)  # which won the race is the checkers' business, not the result's


async def _interpret(run: aiki.WorkflowRun, program: dict[str, Any]) -> list[int]:
    # A schedule's runs share one program: each keys its executions by its own run id.
    rk = f"{program['rk']}:{run.id}" if program.get("per_run") else program["rk"]
    ctx = Ctx(run, rk, int(program["x"]))
    for step in program["steps"]:
        kind = next(k for k in step if k in STEP_KINDS)
        await STEP_KINDS[kind](ctx, step)
    return ctx.out


@step_kind("deadline")
async def _deadline_kind(ctx: Ctx, step: dict[str, Any]) -> None:
    await _deadline(ctx.run, ctx.rk, step)
    ctx.out.append(0)  # whether it expired is the checkers' business, not the result's


@step_kind("child")
async def _child_kind(ctx: Ctx, step: dict[str, Any]) -> None:
    ctx.acc = await _children(ctx.run, step, ctx.acc)
    ctx.out.append(ctx.acc)


STEP_KINDS["children"] = _child_kind  # a fan-out of joined children


async def _deadline(run: aiki.WorkflowRun, rk: str, step: dict[str, Any]) -> None:
    """A deadline scope (``move_on_after``, or ``fail_after`` caught) over tasks, sleeps and
    nested scopes whose values are dropped: when it expires depends on timing. Each exit is
    noted with the node's clock, for the checkers."""
    make = run.fail_after if step.get("fail") else run.move_on_after
    scope = make(step["deadline"])
    position = ""
    try:
        with scope:
            position = scope._scope.position if scope._scope is not None else ""
            if _LEDGER:
                _LEDGER[0].scopes_entered.setdefault((rk, position), trio.current_time())
            for inner in step["steps"]:
                await _in_scope(run, rk, inner, scope)
    except aiki.DeadlineExceeded:
        pass
    node = NODE.get().split(".")[0]  # (the worker's name, without its incarnation)
    # Deadlines are kept on the servers' clock (one time, shared by the servers).
    clock = _CLOCKS.get("s1")
    if _LEDGER and clock is not None and scope.deadline is not None and not scope.replayed:
        _LEDGER[0].deadlines.append((trio.current_time(), run.id, node, scope.deadline,
                                     scope.cancelled_caught, clock.now(), step["deadline"],
                                     rk, position))


async def _in_scope(run: aiki.WorkflowRun, rk: str, inner: dict[str, Any],
                   scope: Any) -> None:
    """One step inside a deadline scope: a task, a sleep, a nested scope, a shield over
    steps (its tasks run to their end though the deadline passes meanwhile), or branches of
    a ``run.gather``, each a sequence of steps (some shielded, beside unshielded siblings
    whose steps the deadline cuts)."""
    if "deadline" in inner:
        await _deadline(run, rk, inner)
    elif "sleep" in inner:
        await run.sleep(inner["sleep"])
    elif "shield" in inner:
        with run.shield():
            for s in inner["shield"]:
                await _in_scope(run, rk, s, scope)
        clock = _CLOCKS.get(NODE.get().split(".")[0])
        if (_LEDGER and clock is not None and scope.deadline is not None
                and clock.now() > scope.deadline):
            _LEDGER[0].sometimes["shielded work outlived its deadline"] += 1
    elif "branches" in inner:
        async def branch(steps: list[dict[str, Any]]) -> None:
            for s in steps:
                await _in_scope(run, rk, s, scope)

        await run.gather(*(branch(b) for b in inner["branches"]))
    else:
        spec = inner["call"]
        await TASKS[spec["task"]].run(run, {**spec, "x": 0, "rk": rk})


async def _children(run: aiki.WorkflowRun, step: dict[str, Any], acc: int) -> int:
    """A child run (detached, started and left, or joined), or a fan-out of joined ones; a
    joined child's result folds into ``acc``."""
    wf = WORKFLOWS[run.version]
    try:
        if "children" in step:
            results = await run.gather(*(wf.call(run, sub) for sub in step["children"]))
            return (acc + sum(sum(r) for r in results)) % 1_000_003
        child = await wf.start_child(run, step["child"], detached=step.get("detached", False))
        if not step.get("join"):
            return acc
        return (acc + sum(await child.result())) % 1_000_003
    except (aiki.ChildFailed, aiki.ChildCancelled):
        if not step.get("catch"):
            raise
        return -1


def _workflow(version: str) -> aiki.Workflow[dict[str, Any], list[int]]:
    async def sim_workflow(run: aiki.WorkflowRun, program: dict[str, Any]) -> list[int]:
        try:
            return await _interpret(run, program)
        except aiki.RunCancelled:
            if program.get("comp"):  # a refund, say: it runs though the run is cancelled
                with run.shield():
                    spec = {"task": COMPENSATION, "label": f"{program['rk']}.comp",
                            "fail": 0, "work": 0.5, "x": 1, "rk": program["rk"]}
                    await TASKS[COMPENSATION].run(run, spec)
            raise

    return aiki.workflow(name="sim", version=version, events=[EV, RACE])(sim_workflow)


WORKFLOWS = {v: _workflow(v) for v in ("1", "2")}
UNSERVED_VERSION = "3"  # enqueued sometimes; no worker has it: the run must stay queued


@attrs.frozen
class Send:
    """One event a client sends to a run, ``at`` seconds after its enqueue was acknowledged
    (a ``race`` send: once it sees the run's ``position``-th race wait (0, 1, ...), ``delta``
    seconds after its due
    time; a ``late`` send: once its watcher heard that the run ended)."""

    id: str  # unique: carried in the payload, so each stored event names its send
    at: float
    name: str
    key: str | None  # keyed sends are retried until answered; others are sent once
    value: int
    server: int  # which server the sender attaches to (modulo their number)
    position: str | None = None
    delta: float = 0.0
    late: bool = False

    @property
    def payload(self) -> dict[str, Any]:
        return {"id": self.id, "v": self.value}


@attrs.frozen
class PlannedRun:
    """One logical enqueue a client makes (retried until acknowledged), and what clients do
    to the run afterwards."""

    item: str  # unique per enqueue
    run_id: str  # chosen by the client once, reused on every retry
    at: float
    version: str
    key: str | None
    program: dict[str, Any]
    server: int = 0  # the enqueuing client's server (modulo their number)
    sends: tuple[Send, ...] = ()  # the ``ev`` sends, made one after another in this order
    races: tuple[Send, ...] = ()  # each aimed at a ``race`` wait's timeout
    wakeups: tuple[tuple[float, int], ...] = ()  # (seconds after the ack, server)
    watch: int | None = None  # a watcher's server; once it hears the end, ``late`` is sent
    late: Send | None = None
    # (seconds after the ack, server) of a watch that begins late, often after the run
    # ended, mostly through the enqueuing client's server (which queued the run).
    late_watch: tuple[float, int] | None = None
    # Status and history reads: (seconds after the ack, server), checked against the ledger.
    reads: tuple[tuple[float, int], ...] = ()
    controls: tuple[Control, ...] = ()
    # (seconds after the ack, server, grace): a client cancels the run then.
    cancels: tuple[tuple[float, int, float], ...] = ()


@attrs.frozen
class Control:
    """A control a client makes: ``pause`` at ``at`` seconds after the ack, resumed ``hold``
    seconds later; ``retry`` once the run failed (re-pinned to ``version`` if given);
    ``fork`` once the run ended, from step ``from_step``, as run ``new_id``."""

    kind: str
    at: float
    server: int
    hold: float = 0.0
    version: str | None = None
    from_step: int = 0
    new_id: str = ""


def _task_spec(r: random.Random, label: str, keys: list[str]) -> dict[str, Any]:
    task = r.choice(list(RETRIES))
    attempts = RETRIES[task].max_attempts
    roll = r.random()
    if roll < 0.08:
        fail = -1  # non-retryable
    elif roll < 0.12:
        fail = -2  # fails every attempt: retries exhausted
    elif roll < 0.5 and attempts > 1:
        fail = r.randrange(1, attempts)  # transient, succeeds within the policy
    else:
        fail = 0
    spec: dict[str, Any] = {"task": task, "label": label, "fail": fail,
                            "work": r.choice([0.0, 0.01, 0.5, 3.0])}
    if r.random() < 0.15:
        spec["key"] = r.choice(keys) if keys and r.random() < 0.5 else f"k-{label}"
        keys.append(spec["key"])
    if fail < 0 and r.random() < 0.5:
        spec["catch"] = True
    return spec


def plan(seed: int, n_runs: int, duration: float) -> list[PlannedRun]:
    r = random.Random(f"{seed}:workload")
    w = random.Random(f"{seed}:waits")
    g = random.Random(f"{seed}:grammar")
    reads = random.Random(f"{seed}:reads")
    late = random.Random(f"{seed}:late-watches")
    planned: list[PlannedRun] = []
    run_keys: list[str] = []
    for i in range(n_runs):
        rk = f"r{i}"
        keys: list[str] = []
        steps: list[dict[str, Any]] = []
        for j in range(r.randint(1, 5)):
            if r.random() < 0.25:
                width = r.randint(2, 4)
                specs = [_task_spec(r, f"{rk}.{j}.{b}", []) for b in range(width)]
                for s in specs:  # a failing branch would cancel its siblings mid-task
                    s.pop("catch", None)
                steps.append({"gather": specs})
            else:
                steps.append({"call": _task_spec(r, f"{rk}.{j}", keys)})
        version = r.choice(["1", "1", "2", "2", "2", UNSERVED_VERSION] if r.random() < 0.3
                           else ["1", "2"])
        key = None
        if r.random() < 0.3:
            key = r.choice(run_keys) if run_keys and r.random() < 0.4 else f"order-{i}"
            run_keys.append(key)
        run_id = f"run-{seed}-{i}-{r.getrandbits(32):08x}"
        program = {"rk": rk, "x": r.randint(0, 1000), "steps": steps}
        at = r.uniform(0, duration * 0.7)
        program = _with_grammar(g, program)
        item = _with_waits(w, PlannedRun(f"e{i}", run_id, at, version, key, program))
        item = attrs.evolve(item, reads=tuple(
            (reads.expovariate(1 / 60.0), reads.randrange(3))
            for _ in range(reads.choice([0, 1, 2, 3]))))
        item = _with_controls(random.Random(f"{seed}:controls:{i}"), item)
        planned.append(_with_late_watch(late, item))
    # Swarm testing: child runs, deadlines and cancels are in 60% of the seeds (drawn from a
    # stream of its own), so the other 40% keep the world as it was without them.
    if random.Random(f"{seed}:structure").random() < 0.4:
        return planned
    k = random.Random(f"{seed}:children")  # streams of their own: the rest stays as it was
    planned = [_with_children(k, item) for item in planned]
    d = random.Random(f"{seed}:deadlines")
    planned = [_with_deadlines(d, item) for item in planned]
    s = random.Random(f"{seed}:shields")
    planned = [_with_shields(s, item) for item in planned]
    c = random.Random(f"{seed}:cancels")
    return [_with_cancels(c, item) for item in planned]


def _deadline_step(r: random.Random, rk: str, depth: int) -> dict[str, Any]:
    inner: list[dict[str, Any]] = []
    for j in range(r.randint(1, 3)):
        roll = r.random()
        if roll < 0.5:
            spec = _task_spec(r, f"{rk}.d{depth}.{j}", [])
            spec.update(fail=0, work=r.choice([0.0, 0.5, 3.0, 20.0, 60.0]))
            spec.pop("key", None)
            spec.pop("catch", None)
            inner.append({"call": spec})
        elif roll < 0.8 or depth >= 1:
            inner.append({"sleep": r.choice([*SHORT_SLEEPS, *LONG_SLEEPS])})
        else:
            inner.append(_deadline_step(r, f"{rk}.n{j}", depth + 1))
    return {"deadline": r.choice([1.0, 5.0, 12.0, 30.0, 120.0]), "fail": r.random() < 0.4,
            "steps": inner}


def _with_deadlines(r: random.Random, item: PlannedRun) -> PlannedRun:
    """Some runs have a deadline scope, sometimes nested, over tasks and sleeps."""
    if r.random() >= 0.3:
        return item
    steps = list(item.program["steps"])
    rk = item.program["rk"]
    steps.insert(r.randint(0, len(steps)), _deadline_step(r, f"{rk}.dl", 0))
    return attrs.evolve(item, program={**item.program, "steps": steps})


def _shielded_call(r: random.Random, label: str) -> dict[str, Any]:
    return {"call": {"task": SHIELDED, "label": label, "fail": r.choice([0, 0, 1]),
                     "work": r.choice([0.5, 3.0, 20.0, 60.0])}}


def _with_shields(r: random.Random, item: PlannedRun) -> PlannedRun:
    """Some runs have a deadline scope with ``run.shield()`` inside: shielded tasks that
    may outlast the deadline, then a task (whose start the expired deadline cuts, the
    shielded task's outcome riding with it); or a ``run.gather`` whose shielded branch runs
    beside unshielded ones that go on stepping (each step re-arms the deadline)."""
    if r.random() >= 0.3:
        return item
    rk = item.program["rk"]
    label = f"{rk}.sh"

    def plain(j: int) -> dict[str, Any]:
        spec = _task_spec(r, f"{label}.p{j}", [])
        spec.update(fail=0, work=r.choice([0.5, 1.0, 3.0]))
        spec.pop("key", None)
        spec.pop("catch", None)
        return {"call": spec}

    if r.random() < 0.5:
        inner: list[dict[str, Any]] = [
            {"shield": [_shielded_call(r, f"{label}.s{j}") for j in range(r.randint(1, 2))]},
            *(plain(j) for j in range(r.randint(1, 2)))]
    else:
        # (A shielded durable sleep: that branch gives its slot back while its siblings
        # step on, until the deadline cuts them.)
        shielded = [{"shield": [{"sleep": r.choice(LONG_SLEEPS)} if r.random() < 0.3
                                else _shielded_call(r, f"{label}.b{b}")]}
                    for b in range(r.randint(1, 2))]
        plains = [[plain(b * 10 + j) for j in range(r.randint(3, 8))]
                  for b in range(r.randint(1, 2))]
        inner = [{"branches": [[s] for s in shielded] + plains}]
    step = {"deadline": r.choice([1.0, 5.0, 12.0, 30.0]), "fail": r.random() < 0.4,
            "steps": inner}
    steps = list(item.program["steps"])
    steps.insert(r.randint(0, len(steps)), step)
    return attrs.evolve(item, program={**item.program, "steps": steps})


MAX_DEPTH = 3  # a run, its children, theirs
MAX_FAN_OUT = 5


def _sub_program(r: random.Random, rk: str, depth: int) -> dict[str, Any]:
    """A child's program: a task or two, and below MAX_DEPTH sometimes children of its own."""
    steps: list[dict[str, Any]] = []
    for j in range(r.randint(1, 2)):
        spec = _task_spec(r, f"{rk}.{j}", [])
        spec.pop("key", None)
        spec["work"] = r.choice([0.0, 0.5, 3.0, 20.0])  # some long: cancels find them running
        steps.append({"call": spec})
    if depth + 1 < MAX_DEPTH and r.random() < 0.5:
        steps.insert(r.randint(0, len(steps)), _child_step(r, f"{rk}.k", depth + 1))
    return {"rk": rk, "x": r.randint(0, 1000), "steps": steps}


def _child_step(r: random.Random, rk: str, depth: int) -> dict[str, Any]:
    roll = r.random()
    if roll < 0.4:
        width = r.randint(2, MAX_FAN_OUT)
        return {"children": [_sub_program(r, f"{rk}{b}", depth) for b in range(width)]}
    step: dict[str, Any] = {"child": _sub_program(r, f"{rk}0", depth)}
    if roll < 0.55:
        step["detached"] = True
    else:
        step["join"] = roll < 0.9  # else started and left: the parent's end waits for it
    if step.get("join") and r.random() < 0.3:
        step["catch"] = True
    return step


def _with_children(r: random.Random, item: PlannedRun) -> PlannedRun:
    """Some runs start children: trees up to MAX_DEPTH deep, fan-outs up to MAX_FAN_OUT
    wide, detached children, children started and never joined."""
    if r.random() >= 0.3 or item.version == UNSERVED_VERSION:
        return item
    steps = list(item.program["steps"])
    rk = item.program["rk"]
    steps.insert(r.randint(0, len(steps)), _child_step(r, f"{rk}.k", 1))
    return attrs.evolve(item, program={**item.program, "steps": steps})


def _with_cancels(r: random.Random, item: PlannedRun) -> PlannedRun:
    """Some runs are cancelled at a random moment (before they run, mid-task, while they
    wait, after they end), with or without a grace period; some compensate."""
    if r.random() >= 0.25:
        return item
    n = len(item.program["steps"])
    cancels = tuple((r.uniform(0, 25.0 * n), r.randrange(3), r.choice([0.0, 10.0, 60.0]))
                    for _ in range(r.choice([1, 1, 2])))
    program = {**item.program, "comp": r.random() < 0.6}
    return attrs.evolve(item, program=program, cancels=cancels)


def _with_grammar(r: random.Random, program: dict[str, Any]) -> dict[str, Any]:
    """Repeated identical calls, loops, branches on earlier results, keys shared between
    calls, and the deterministic helpers, among the program's steps (a stream of their own)."""
    rk = program["rk"]
    steps = list(program["steps"])
    keys: list[str] = []
    for n in range(r.choice([0, 1, 1, 2, 3])):
        label = f"{rk}.g{n}"
        roll = r.random()
        spec = _task_spec(r, label, keys)
        if roll < 0.35:
            spec["fail"] = max(spec["fail"], 0)  # (a refusal would end the repeats early)
            step: dict[str, Any] = {"repeat": spec, "times": r.randint(2, 3)}
        elif roll < 0.55:
            spec["fail"] = max(spec["fail"], 0)
            step = {"loop": {"call": spec, "until": r.choice([2, 3, 5]),
                             "max": r.randint(2, 4)}}
        elif roll < 0.75:
            other = _task_spec(r, f"{label}b", keys)
            step = {"branch": [spec, other]}
        else:
            step = {"helper": r.choice(["now", "random", "uuid"]), "then": spec}
        steps.insert(r.randint(0, len(steps)), step)
    return {**program, "steps": steps}


def _with_late_watch(r: random.Random, item: PlannedRun) -> PlannedRun:
    """A third of the runs are also watched late (from a stream of its own): the run has
    often ended by then, through any server, and the watch asks the server that queued it,
    which must not trust that the run still goes on."""
    if r.random() >= 0.35:
        return item
    at = r.uniform(5.0, 120.0)
    server = item.server if r.random() < 0.7 else r.randrange(3)
    return attrs.evolve(item, late_watch=(at, server))


def _with_controls(r: random.Random, item: PlannedRun) -> PlannedRun:
    """Pauses, a retry and a fork, from a stream of their own (the rest is drawn as before)."""
    n = len(item.program["steps"])
    controls: list[Control] = []
    for _ in range(r.choice([0, 0, 1, 1, 2])):
        controls.append(Control("pause", r.uniform(0, 30.0 * max(n, 1)), r.randrange(3),
                                hold=r.choice([0.5, 5.0, 30.0, 120.0])))
    if r.random() < 0.3:
        controls.append(Control("retry", 0.0, r.randrange(3),
                                version=r.choice([None, None, "1", "2"])))
    # A fork has no sends of its own: only of a program that waits for none.
    if r.random() < 0.25 and not any("event" in s for s in item.program["steps"]):
        controls.append(Control("fork", 0.0, r.randrange(3), from_step=r.randint(0, n + 2),
                                version=r.choice([None, "1", "2"]),
                                new_id=f"{item.run_id}-fork"))
    if any(c.kind == "retry" for c in controls):
        # A retried run ends again: a send after its first end is not late.
        item = attrs.evolve(item, late=None)
    return attrs.evolve(item, controls=tuple(controls))


def _with_waits(r: random.Random, item: PlannedRun) -> PlannedRun:
    """Sleeps and event waits among the run's steps, and the client actions that go with
    them (from a stream of their own: the task steps are drawn as before)."""
    rk = item.program["rk"]
    steps = list(item.program["steps"])
    for _ in range(r.choice([0, 1, 1, 2, 3])):
        roll = r.random()
        if roll < 0.4:
            step: dict[str, Any] = {"sleep": r.choice(SHORT_SLEEPS if r.random() < 0.5
                                                      else LONG_SLEEPS)}
        elif roll < 0.75:
            # No timeout, or one that never comes in a seed: the value must arrive.
            step = {"event": "ev", "timeout": r.choice([None, 7200.0])}
        else:
            step = {"race": r.choice([2.0, 8.0, 20.0, 45.0])}
        steps.insert(r.randint(0, len(steps)), step)
    program = {**item.program, "steps": steps}
    n = len(steps)
    server = r.randrange(3)
    sends: list[Send] = []
    for k in range(sum(1 for s in steps if "event" in s)):
        sends.append(Send(f"{rk}.ev{k}", 0.0, "ev", f"{rk}-ev{k}", r.randint(0, 999),
                          r.randrange(3)))
        if r.random() < 0.25:  # the same key again, another value: must store nothing
            old = r.choice(sends)
            sends.append(Send(f"{rk}.dup{k}", 0.0, "ev", old.key, r.randint(0, 999),
                              r.randrange(3)))
    # Some before the run reaches its wait (buffered), some while it waits.
    times = sorted(r.uniform(0, 60.0 * max(n, 1)) for _ in sends)
    sends = [attrs.evolve(s, at=t) for s, t in zip(sends, times, strict=True)]
    races = tuple(
        Send(f"{rk}.race{j}", 0.0, "race", f"{rk}-race{j}" if r.random() < 0.7 else None,
             r.randint(0, 999), r.randrange(3), position=str(k), delta=r.uniform(-0.5, 0.5))
        for k, j in enumerate(j for j, s in enumerate(steps) if "race" in s))
    wakeups = tuple((r.uniform(0, 40.0 * max(n, 1)), r.randrange(3))
                    for _ in range(r.choice([0, 0, 1, 2]))
                    if any("sleep" in s for s in steps))
    watch = r.randrange(3) if r.random() < 0.6 else None
    late = None if watch is None else Send(f"{rk}.late", 0.0, "ev", f"{rk}-late",
                                           r.randint(0, 999), r.randrange(3), late=True)
    return attrs.evolve(item, program=program, server=server, sends=tuple(sends), races=races,
                        wakeups=wakeups, watch=watch, late=late)


# -- schedules -------------------------------------------------------------------------------
OVERLAPS = ("skip", "buffer_one", "allow", "cancel_previous")


@attrs.frozen
class PlannedSchedule:
    """A schedule a client defines at ``at`` through server ``server``, and the triggers
    clients send it (seconds after its definition was acknowledged, server, trigger id)."""

    id: str
    at: float
    every: float | None
    cron: str | None
    overlap: str
    window: float
    program: dict[str, Any]
    server: int
    triggers: tuple[tuple[float, int, str], ...] = ()


def plan_schedules(seed: int, duration: float) -> list[PlannedSchedule]:
    """One to three schedules, each overlap policy among them, from a stream of their own
    (the runs and faults of a seed stay what they were without schedules). Their runs take
    from a fraction of their interval to several intervals, so occurrences overlap."""
    r = random.Random(f"{seed}:schedules")
    first = r.randrange(len(OVERLAPS))
    out = []
    for i in range(r.choice([1, 2, 2, 3])):
        every = r.choice([20.0, 30.0, 45.0, 60.0, None])
        cron = "* * * * *" if every is None else None
        steps: list[dict[str, Any]] = [{"call": {
            "task": r.choice(["t-none", "t-exp"]), "label": f"sch{i}.0", "fail": 0,
            "work": r.choice([0.01, 0.5, 3.0])}}]
        if r.random() < 0.7:
            steps.append({"sleep": r.choice([5.0, 15.0, 40.0, 90.0])})
        program = {"rk": f"sch{i}", "x": r.randint(0, 1000), "steps": steps, "per_run": True}
        triggers = tuple((r.uniform(0, duration), r.randrange(3), f"sch{i}-t{k}")
                         for k in range(r.choice([0, 0, 1, 2])))
        out.append(PlannedSchedule(
            f"sch{i}", r.uniform(0, duration * 0.3), every, cron,
            OVERLAPS[(first + i) % len(OVERLAPS)], r.choice([30.0, 60.0, 120.0]), program,
            r.randrange(3), triggers))
    return out
