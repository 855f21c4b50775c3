"""HTTP events end to end: a real uvicorn server on 127.0.0.1 serving ``make_app()`` with
its default ``send`` (``ray_workflows.aio.send_event``, called from uvicorn's own event
loop thread), a real httpx client, and workflows run by the real manager on the session's
Ray. ``tests/test_http_listener.py`` covers the app's rules against a bare mailbox; this
module checks that they hold through the engine."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray
import uvicorn
from ray_workflows.listeners.http import make_app

import ray_workflows as workflow

TOKEN = "s3cret"


class Server:
    """uvicorn serving ``app`` in a thread of its own, on a free port of 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="uvicorn"
        )

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not shut down within 15 s"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server(make_app(allow_unauthenticated=True)) as s:
        yield s


@pytest.fixture(scope="module")
def secured() -> Iterator[Server]:
    with Server(make_app(token=TOKEN)) as s:
        yield s


@pytest.fixture
def client(server: Server, storage: str) -> Iterator[httpx.Client]:
    # ``storage`` selects the session storage: the app's default send uses the
    # configuration of this process, read when each request arrives.
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@ray.remote
def consume(event: Any) -> dict[str, Any]:
    return {"got": event}


@ray.remote
def pair(first: Any, second: Any) -> tuple[Any, Any]:
    return first, second


@ray.remote
def then(_: Any, key: str) -> str:
    """``key``, once its first argument (an event) is there: orders a second wait."""
    return key


def post(client: httpx.Client, wid: str, key: str, payload: Any, **headers: str) -> httpx.Response:
    return client.post(f"/workflows/{wid}/events/{key}", json=payload, headers=headers)


def pending_keys(storage: str, wid: str, key: str) -> list[str]:
    """Event records of ``key`` still in the workflow's mailbox (not yet acknowledged)."""
    path = os.path.join(storage, "workflows", wid, "mailbox", "keys", key, "events")
    names = os.listdir(path) if os.path.isdir(path) else []
    return sorted(n for n in names if n[:1].isdigit())  # not the storage's temp files


def test_a_waiting_workflow_gets_the_posted_payload(client: httpx.Client, wid: str) -> None:
    ref = workflow.run_async(
        consume.bind(workflow.wait_for_event("http", event_key="k")), workflow_id=wid
    )
    time.sleep(0.3)  # let it reach the wait (an earlier POST is kept too: next test)
    payload = {"approved": True, "by": "ana", "amount": [1, 2.5, None]}
    response = post(client, wid, "k", payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["workflow_id"] == wid and body["key"] == "k" and body["event_id"]
    assert ray.get(ref, timeout=60) == {"got": payload}
    assert workflow.get_status(wid) == workflow.SUCCESSFUL


def test_a_post_before_the_workflow_waits_is_kept(
    client: httpx.Client, storage: str, wid: str
) -> None:
    # The wait on "k" starts only after the "gate" event: its key is the gate's payload.
    late_wait = workflow.wait_for_event(
        "http", event_key=workflow.wait_for_event("http", event_key="gate")
    )
    ref = workflow.run_async(consume.bind(late_wait), workflow_id=wid)
    response = post(client, wid, "k", "sent early")
    assert response.status_code == 200, response.text
    time.sleep(0.5)
    assert workflow.get_status(wid) == workflow.RUNNING  # still waiting on the gate
    assert len(pending_keys(storage, wid, "k")) == 1  # kept in the mailbox, not rejected
    assert post(client, wid, "gate", "k").status_code == 200
    assert ray.get(ref, timeout=60) == {"got": "sent early"}
    assert pending_keys(storage, wid, "k") == []  # acknowledged once checkpointed


def test_a_post_to_an_unknown_workflow_is_404(client: httpx.Client, storage: str) -> None:
    response = post(client, "no-such-workflow", "k", 1)
    assert response.status_code == 404, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert "no-such-workflow" in error
    assert pending_keys(storage, "no-such-workflow", "k") == []


def test_a_post_to_a_finished_workflow_is_409(client: httpx.Client, storage: str, wid: str) -> None:
    assert workflow.run(consume.bind("done"), workflow_id=wid) == {"got": "done"}
    response = post(client, wid, "k", 1)
    assert response.status_code == 409, response.text
    assert "SUCCESSFUL" in response.json()["error"]
    assert pending_keys(storage, wid, "k") == []


def test_idempotency_key_twice_is_delivered_once(
    client: httpx.Client, storage: str, wid: str
) -> None:
    # Two waits on the same key, the second starting after the first has its event: if
    # the retried POST were stored again, the second wait would get the duplicate.
    first = workflow.wait_for_event("http", event_key="pay")
    second = workflow.wait_for_event("http", event_key=then.bind(first, "pay"))
    ref = workflow.run_async(pair.bind(first, second), workflow_id=wid)
    once = post(client, wid, "pay", {"n": 1}, **{"Idempotency-Key": "payment-1"})
    again = post(client, wid, "pay", {"n": 1}, **{"Idempotency-Key": "payment-1"})
    assert once.status_code == again.status_code == 200, (once.text, again.text)
    assert once.json()["event_id"] == again.json()["event_id"] == "payment-1"
    other = post(client, wid, "pay", {"n": 2}, **{"Idempotency-Key": "payment-2"})
    assert other.status_code == 200, other.text
    assert ray.get(ref, timeout=60) == ({"n": 1}, {"n": 2})
    # A retry after delivery stores nothing either (the claim record outlives the event).
    late = post(client, wid, "pay", {"n": 1}, **{"Idempotency-Key": "payment-1"})
    assert late.status_code == 200 and late.json()["event_id"] == "payment-1"
    assert pending_keys(storage, wid, "pay") == []


def test_bearer_token(secured: Server, storage: str, wid: str) -> None:
    ref = workflow.run_async(
        consume.bind(workflow.wait_for_event("http", event_key="k")), workflow_id=wid
    )
    url = f"/workflows/{wid}/events/k"
    with httpx.Client(base_url=secured.url, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = c.post(url, json="nope", headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "token" in response.json()["error"]
        assert pending_keys(storage, wid, "k") == []  # nothing stored
        response = c.post(url, json="yes", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200, response.text
    assert ray.get(ref, timeout=60) == {"got": "yes"}


@pytest.mark.parametrize(
    "content", [b"{not json", b"", b'{"a": 1'], ids=["garbage", "empty", "cut"]
)
def test_a_malformed_body_is_400(
    client: httpx.Client, storage: str, wid: str, content: bytes
) -> None:
    ref = workflow.run_async(
        consume.bind(workflow.wait_for_event("http", event_key="k")), workflow_id=wid
    )
    response = client.post(f"/workflows/{wid}/events/k", content=content)
    assert response.status_code == 400, response.text
    assert "JSON" in response.json()["error"]
    assert pending_keys(storage, wid, "k") == []
    # The workflow still waits, and takes the next well-formed event.
    assert post(client, wid, "k", "fine").status_code == 200
    assert ray.get(ref, timeout=60) == {"got": "fine"}


def test_the_server_finds_the_manager_itself(client: httpx.Client, wid: str) -> None:
    # No cached manager handle: the first POST looks the manager up (and would create
    # it) from uvicorn's event loop, in uvicorn's thread.
    from ray_workflows._core import config

    ref = workflow.run_async(
        consume.bind(workflow.wait_for_event("http", event_key="k")), workflow_id=wid
    )
    config.forget_managers()
    response = post(client, wid, "k", "found")
    assert response.status_code == 200, response.text
    assert ray.get(ref, timeout=60) == {"got": "found"}


def test_a_bad_key_is_400(client: httpx.Client, wid: str) -> None:
    response = post(client, wid, "a..b", 1)
    assert response.status_code == 400, response.text
    assert "event key" in response.json()["error"]
