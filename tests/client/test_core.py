"""The sans-IO client core on its own: frames in, frames and events out, no socket, clock or
thread. Every front end (Trio, asyncio, blocking) relies on exactly this behaviour."""

from __future__ import annotations

import json
import random
from typing import Any

import attrs
import pytest

import aiki
from aiki import protocol as p
from aiki.client import core
from aiki.client.core import Backoff, ClientProtocol, Closing, Failed, Replied, Welcomed
from aiki.records import RunRecord

WELCOME = dict(server_id="s", lease_ttl=30.0, heartbeat_interval=10.0)


def client(**options: Any) -> ClientProtocol:
    return ClientProtocol(core.client_hello("client-1", "tok"), "ws://test", rng=random.Random(1),
                          **options)


def welcome(proto: ClientProtocol, frame: str) -> Welcomed:
    """Answer the hello in ``frame``; the Welcomed event."""
    hello = p.decode(frame)
    assert isinstance(hello, p.Hello) and hello.role == "client" and hello.token == "tok"
    [event] = proto.receive(p.encode(p.Welcome(hello.req, **WELCOME)))
    assert isinstance(event, Welcomed)
    return event


def reqs(frame: str | None) -> list[Any]:
    assert frame is not None
    return p.decode_frame(frame)


def run_record(state: Any, result: str | None = None, error_type: str | None = None,
               error_message: str | None = None, error_traceback: str | None = None
               ) -> RunRecord:
    return RunRecord(id="r1", workflow="wf", version="1", payload="null", state=state,
                     idempotency_key=None, attempts=1, lease_epoch=1, lease_owner=None,
                     lease_expires_at=None, result=result, error_type=error_type,
                     error_message=error_message, created_at=1.0, updated_at=2.0,
                     finished_at=2.0, error_traceback=error_traceback)


def test_requests_wait_for_the_welcome_then_go_out_in_one_frame() -> None:
    proto = client()
    r1, frame1 = proto.request(core.get_status("r1"))
    r2, frame2 = proto.request(core.list_workers())
    assert frame1 is None and frame2 is None and not proto.is_open  # nothing to send on yet
    event = welcome(proto, proto.opened())
    assert proto.is_open and proto.connections == 1
    assert [(type(m), m.req) for m in reqs(event.resend)] == [(p.GetRun, r1),
                                                              (p.ListWorkers, r2)]
    r3, frame3 = proto.request(core.get_history("r1"))
    assert isinstance(p.decode(frame3 or ""), p.GetHistory)  # open: out at once


def test_replies_are_matched_by_req_and_read_into_values() -> None:
    proto = client()
    welcome(proto, proto.opened())
    r_workers, _ = proto.request(core.list_workers())
    r_enqueue, frame = proto.request(core.enqueue("wf", "1", version=None, idempotency_key="k",
                                                  run_id="id-1"))
    sent = p.decode(frame or "")
    assert (sent.workflow, sent.payload, sent.idempotency_key, sent.run_id) == (
        "wf", "1", "k", "id-1")
    worker = p.WorkerInfo("w", (p.WorkflowRef("wf", "1"),), 4, 1, 1.0, None)
    # Two replies in one batch frame, in the other order.
    frame = p.encode_frame([p.encode(p.Enqueued(r_enqueue, "id-1", "1", True)),
                            p.encode(p.WorkerList(r_workers, (worker,)))])
    events = proto.receive(frame)
    assert events == [Replied(r_enqueue, p.Enqueued(r_enqueue, "id-1", "1", True)),
                      Replied(r_workers, [worker])]
    assert proto.receive(frame) == []  # answered already: a duplicate is dropped


def test_refusals_become_the_errors_the_trio_client_raises() -> None:
    proto = client()
    welcome(proto, proto.opened())
    cases = {"RunNotFound": aiki.RunNotFound, "UnknownWorkflow": aiki.UnknownWorkflow,
             "PayloadError": aiki.PayloadError, "Mystery": aiki.AikiError}
    for error_type, cls in cases.items():
        req, _ = proto.request(core.get_status("r1"))
        [event] = proto.receive(p.encode(p.Refused(req, error_type, "why")))
        assert isinstance(event, Failed) and type(event.error) is cls
        assert "why" in str(event.error)
    req, _ = proto.request(core.get_status("r1"))
    [event] = proto.receive(p.encode(p.Ok(req)))  # a reply of the wrong type
    assert isinstance(event, Failed) and isinstance(event.error, aiki.AikiError)
    assert "expected 'run_info'" in str(event.error)


def test_wait_for_completion_decodes_the_result_or_raises_workflow_failed() -> None:
    proto = client()
    welcome(proto, proto.opened())
    req, _ = proto.request(core.wait_for_completion("r1", int, timeout=None))
    [done] = proto.receive(p.encode(p.RunEnded(req, run_record("completed", "42"))))
    assert done == Replied(req, 42)
    req, _ = proto.request(core.wait_for_completion("r1", int, timeout=5))
    failed = run_record("failed", error_type="ValueError", error_message="bad",
                        error_traceback="Traceback (most recent call last): ...")
    [event] = proto.receive(p.encode(p.RunEnded(req, failed)))
    assert isinstance(event, Failed) and isinstance(event.error, aiki.WorkflowFailed)
    assert (event.error.error_type, event.error.message) == ("ValueError", "bad")
    assert event.error.remote_traceback == "Traceback (most recent call last): ..."


def test_timeouts_are_data() -> None:
    assert core.get_status("r").limit(30.0) == 30.0
    forever = core.wait_for_completion("r", Any, timeout=None)
    assert forever.limit(30.0) is None
    soon = core.wait_for_completion("r", Any, timeout=2.5)
    assert soon.limit(30.0) == 2.5
    assert str(soon.timed_out(30.0)) == "run r did not finish within 2.5 s"
    assert str(core.list_workers().timed_out(7.0)) == "no reply from the server within 7.0 s"


def test_a_lost_connection_keeps_requests_for_the_next_one_with_the_same_req() -> None:
    proto = client()
    welcome(proto, proto.opened())
    req, frame = proto.request(core.get_status("r1"))
    assert frame is not None
    assert proto.lost(aiki.ConnectionLost("reset")) == []  # it waits for a new connection
    assert proto.ended is None and not proto.is_open
    event = welcome(proto, proto.opened())
    assert [m.req for m in reqs(event.resend)] == [req]
    assert proto.connections == 2


def test_an_abandoned_request_is_not_resent_and_its_late_reply_is_dropped() -> None:
    proto = client()
    welcome(proto, proto.opened())
    req, _ = proto.request(core.get_status("r1"))
    proto.abandon(req)
    proto.lost(aiki.ConnectionLost("reset"))
    assert welcome(proto, proto.opened()).resend is None
    assert proto.receive(p.encode(p.Refused(req, "RunNotFound", "late"))) == []


@pytest.mark.parametrize("error", [aiki.AuthenticationFailed("wrong token"),
                                   aiki.errors.ProtocolError("version 2 unknown")])
def test_a_refusal_no_reconnection_can_fix_fails_every_request(error: Exception) -> None:
    proto = client()
    welcome(proto, proto.opened())
    r1, _ = proto.request(core.list_workers())
    r2, _ = proto.request(core.get_status("r1"))
    assert proto.lost(error) == [Failed(r1, error), Failed(r2, error)]
    assert proto.ended is error
    with pytest.raises(type(error)):
        proto.request(core.list_workers())


def test_the_first_connection_failing_ends_the_client_at_once() -> None:
    proto = client()
    req, _ = proto.request(core.list_workers())
    events = proto.lost(OSError("connection refused"))
    assert len(events) == 1 and isinstance(events[0], Failed)
    assert isinstance(proto.ended, aiki.ConnectionLost)
    assert "cannot connect to ws://test: connection refused" in str(proto.ended)


def test_without_reconnection_a_loss_ends_the_client() -> None:
    proto = client(reconnect=None)
    welcome(proto, proto.opened())
    proto.lost(aiki.ConnectionLost("reset"))
    assert isinstance(proto.ended, aiki.ConnectionLost)


def test_goodbyes_and_refused_hellos_close_the_connection_with_their_reason() -> None:
    proto = client()
    frame = proto.opened()
    hello = p.decode(frame)
    [event] = proto.receive(p.encode(p.Refused(hello.req, "AuthenticationFailed", "no")))
    assert isinstance(event, Closing) and isinstance(event.error, aiki.AuthenticationFailed)
    hello = p.decode(proto.opened())
    [odd] = proto.receive(p.encode(p.Ok(hello.req)))  # not a welcome
    assert isinstance(odd, Closing) and isinstance(odd.error, aiki.errors.ProtocolError)
    assert "expected 'welcome' from ws://test" in str(odd.error)
    welcome(proto, proto.opened())
    [bye] = proto.receive(p.encode(p.Goodbye("server shutting down")))
    assert isinstance(bye, Closing) and type(bye.error) is aiki.ConnectionLost
    assert "server shutting down" in str(bye.error)
    [bye] = proto.receive(p.encode(p.Goodbye("bad token", "AuthenticationFailed")))
    assert isinstance(bye.error, aiki.AuthenticationFailed)


def test_undecodable_messages_are_skipped_not_fatal() -> None:
    proto = client()
    welcome(proto, proto.opened())
    req, _ = proto.request(core.list_workers())
    frame = json.dumps([{"type": "no-such-message"}, p.to_wire(p.WorkerList(req, ()))])
    assert proto.receive(frame) == [Replied(req, [])]
    assert proto.receive("not json") == []


def test_a_request_over_the_frame_limit_is_refused_and_nothing_is_kept() -> None:
    proto = client(max_frame_bytes=1024)
    welcome(proto, proto.opened())
    with pytest.raises(aiki.errors.ProtocolError, match="over the frame limit of 1024"):
        proto.request(core.enqueue("wf", json.dumps("x" * 2000), version=None,
                                   idempotency_key=None, run_id="id"))
    assert welcome(proto, proto.opened()).resend is None
    # Bytes, not characters: 400 snowmen in a run id are 1,200 bytes on the wire.
    with pytest.raises(aiki.errors.ProtocolError, match="over the frame limit of 1024"):
        proto.request(core.enqueue("wf", "1", version=None, idempotency_key=None,
                                   run_id="\u2603" * 400))


def test_end_fails_whatever_still_waits() -> None:
    proto = client()
    req, _ = proto.request(core.list_workers())
    closed = aiki.ConnectionLost("the client is closed")
    assert proto.end(closed) == [Failed(req, closed)]


def test_list_runs_refuses_what_the_server_would_refuse_before_sending() -> None:
    with pytest.raises(ValueError, match="unknown run state 'x'"):
        core.list_runs(workflow=None, state="x", limit=5)
    with pytest.raises(ValueError, match="limit must be an int from 1 to 1000"):
        core.list_runs(workflow=None, state=None, limit=5000)


def test_reconnection_delays_grow_with_jitter_and_reset_on_a_welcome() -> None:
    proto = client(reconnect=Backoff(initial=0.1, maximum=1.0))
    welcome(proto, proto.opened())
    delays = [proto.next_delay() for _ in range(6)]
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    welcome(proto, proto.opened())
    assert proto.next_delay() <= 0.1


def test_payloads_are_encoded_at_the_call_site() -> None:
    @attrs.frozen
    class Order:
        id: str

    assert core.encode_payload("wf", Order("o"), Order) == '{"id":"o"}'
    with pytest.raises(aiki.PayloadError, match="payload of workflow 'wf'"):
        core.encode_payload("wf", object())
