"""The HTTP event endpoint against a real uvicorn server on 127.0.0.1, with a real client.

The server's ``send`` stores into a real Mailbox on real file storage, and knows
a workflow exists when its ``meta.json`` does (the engine's send_event does the
same against its store).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from helpers import faulty_uri
from ray_workflows.backends.clocks import VirtualClock
from ray_workflows.listeners.http import HTTPListener, SendEvent, make_app
from starlette.applications import Starlette
from starlette.routing import Mount

from ray_workflows import plugins
from ray_workflows import storage as storage_module
from ray_workflows._core import mailbox_counts
from ray_workflows._core.events import EventContext, use_context
from ray_workflows._core.mailbox import Mailbox
from ray_workflows.exceptions import MailboxFullError, WorkflowNotFoundError
from ray_workflows.storage import Storage
from ray_workflows.testing import ListenerConformance

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> None:
    """Overrides the conftest's: nothing here needs Ray, so these tests start none
    (when other modules run in the same session, their Ray is simply unused here)."""


def storage_sender(storage: Storage) -> SendEvent:
    async def send(workflow_id: str, key: str, payload: Any, *, event_id: str | None = None) -> str:
        if not await storage.exists(f"workflows/{workflow_id}/meta.json"):
            raise WorkflowNotFoundError.of(workflow_id, storage.uri)
        return await Mailbox(storage).send(workflow_id, key, payload, event_id=event_id)

    return send


class Server:
    """uvicorn serving an app in a thread of its own, on a socket bound beforehand."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Storage:
    return storage_module.open_storage(str(tmp_path_factory.mktemp("http") / "storage"))


@pytest.fixture(scope="module")
def server(disk: Storage) -> Iterator[Server]:
    with Server(make_app(send=storage_sender(disk), token=TOKEN, max_body_bytes=64 * 1024)) as s:
        yield s


@pytest.fixture
async def wid(disk: Storage, wid: str) -> str:
    """A workflow that exists (the conftest's unique id, with a meta.json)."""
    await disk.put(f"workflows/{wid}/meta.json", b'{"status": "RUNNING"}')
    return wid


@pytest.fixture
async def client(server: Server) -> Any:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        yield c


async def test_post_answers_200_once_the_event_is_stored(
    client: httpx.AsyncClient, disk: Storage, wid: str
) -> None:
    response = await client.post(
        f"/workflows/{wid}/events/approval", json={"ok": True, "by": "ana"}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["workflow_id"] == wid and body["key"] == "approval"
    assert await Mailbox(disk).pending(wid, "approval") == [body["event_id"]]
    claimed = await asyncio.wait_for(Mailbox(disk).claim(wid, "approval", "t"), 10)
    assert claimed == (body["event_id"], {"ok": True, "by": "ana"})


@pytest.mark.parametrize(
    "payload",
    [None, 0, "text", [1, "two", None], {"nested": {"a": [1.5]}}],
    ids=["null", "zero", "string", "list", "object"],
)
async def test_any_json_document_is_a_payload(
    client: httpx.AsyncClient, disk: Storage, wid: str, payload: Any
) -> None:
    # json.dumps: httpx sends no body at all for json=None.
    body = json.dumps(payload).encode()
    response = await client.post(f"/workflows/{wid}/events/k", content=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert (await asyncio.wait_for(Mailbox(disk).claim(wid, "k", "t"), 10))[1] == payload


async def test_a_waiting_claimer_wakes_as_the_post_is_stored(
    client: httpx.AsyncClient, disk: Storage, wid: str
) -> None:
    # The server runs in another thread and loop; its send wakes this loop's claimer.
    claim = asyncio.create_task(Mailbox(disk, poll_interval=60).claim(wid, "go", "t"))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    response = await client.post(f"/workflows/{wid}/events/go", json="now", headers=AUTH)
    assert response.status_code == 200
    assert (await asyncio.wait_for(claim, 10))[1] == "now"
    assert time.monotonic() - started < 3


async def test_idempotency_key_delivers_once(
    client: httpx.AsyncClient, disk: Storage, wid: str
) -> None:
    headers = {**AUTH, "Idempotency-Key": "payment-42"}
    for _ in range(3):
        response = await client.post(f"/workflows/{wid}/events/paid", json=42, headers=headers)
        assert response.status_code == 200
        assert response.json()["event_id"] == "payment-42"
    # The same key with another payload: refused (409), the first event stands.
    response = await client.post(f"/workflows/{wid}/events/paid", json=43, headers=headers)
    assert response.status_code == 409 and "payment-42" in response.json()["error"]
    assert await Mailbox(disk).pending(wid, "paid") == ["payment-42"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"{not json", "JSON"), (b"", "JSON"), (b"\xff\xfe", "JSON"), (b'{"a": 1', "JSON")],
    ids=["garbage", "empty", "binary", "truncated"],
)
async def test_malformed_body_is_400(
    client: httpx.AsyncClient, disk: Storage, wid: str, content: bytes, needle: str
) -> None:
    response = await client.post(f"/workflows/{wid}/events/k", content=content, headers=AUTH)
    assert response.status_code == 400
    assert needle in response.json()["error"]
    assert await Mailbox(disk).pending(wid, "k") == []


@pytest.mark.parametrize(
    ("path", "headers", "needle"),
    [
        ("/events/a..b", {}, "event key"),
        ("/events/x", {"Idempotency-Key": "a/b"}, "Idempotency-Key"),
        ("/events/x", {"Idempotency-Key": ""}, "Idempotency-Key"),
    ],
    ids=["dots-in-key", "slash-in-idempotency-key", "empty-idempotency-key"],
)
async def test_bad_key_or_idempotency_key_is_400(
    client: httpx.AsyncClient, wid: str, path: str, headers: dict[str, str], needle: str
) -> None:
    response = await client.post(f"/workflows/{wid}{path}", json=1, headers={**AUTH, **headers})
    assert response.status_code == 400
    assert needle in response.json()["error"]


async def test_unknown_workflow_is_404(client: httpx.AsyncClient, disk: Storage) -> None:
    response = await client.post("/workflows/no-such-workflow/events/k", json=1, headers=AUTH)
    assert response.status_code == 404
    assert "no-such-workflow" in response.json()["error"]
    # The storage's path or bucket is not for whoever can reach the endpoint.
    assert disk.uri not in response.text and "storage" not in response.text
    assert await disk.list("workflows/no-such-workflow/") == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
    ids=["missing", "wrong", "basic", "no-scheme", "longer"],
)
async def test_missing_or_wrong_token_is_401(
    client: httpx.AsyncClient, disk: Storage, wid: str, headers: dict[str, str]
) -> None:
    response = await client.post(f"/workflows/{wid}/events/k", json=1, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert await Mailbox(disk).pending(wid, "k") == []


async def test_token_scheme_is_case_insensitive(client: httpx.AsyncClient, wid: str) -> None:
    headers = {"Authorization": f"bearer {TOKEN}"}
    response = await client.post(f"/workflows/{wid}/events/k", json=1, headers=headers)
    assert response.status_code == 200


async def test_body_over_the_limit_is_413(client: httpx.AsyncClient, wid: str) -> None:
    response = await client.post(f"/workflows/{wid}/events/k", json="x" * 70_000, headers=AUTH)
    assert response.status_code == 413


async def test_ray_2_47_route_and_body(client: httpx.AsyncClient, disk: Storage, wid: str) -> None:
    body = {"event_key": "legacy", "event_payload": "event_message"}
    response = await client.post(f"/event/send_event/{wid}", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert (await asyncio.wait_for(Mailbox(disk).claim(wid, "legacy", "t"), 10))[1] == (
        "event_message"
    )
    response = await client.post(f"/event/send_event/{wid}", json={"event_key": "k"}, headers=AUTH)
    assert response.status_code == 400
    assert "event_payload" in response.json()["error"]


async def test_wrong_method_and_unknown_path(client: httpx.AsyncClient, wid: str) -> None:
    assert (await client.get(f"/workflows/{wid}/events/k", headers=AUTH)).status_code == 405
    assert (await client.post("/nowhere", json=1, headers=AUTH)).status_code == 404


def test_an_app_without_a_token_must_be_asked_for_by_name() -> None:
    with pytest.raises(ValueError, match="allow_unauthenticated=True"):
        make_app()


async def test_app_without_a_token_accepts_anyone(disk: Storage, wid: str) -> None:
    with Server(make_app(send=storage_sender(disk), allow_unauthenticated=True)) as open_server:
        async with httpx.AsyncClient(base_url=open_server.url, timeout=10) as c:
            response = await c.post(f"/workflows/{wid}/events/k", json="open")
    assert response.status_code == 200


async def test_mounted_in_another_starlette_app(disk: Storage, wid: str) -> None:
    app = make_app(send=storage_sender(disk), token=TOKEN)
    parent = Starlette(routes=[Mount("/hooks", app=app)])
    transport = httpx.ASGITransport(app=parent)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        response = await c.post(f"/hooks/workflows/{wid}/events/mounted", json=[1, 2], headers=AUTH)
    assert response.status_code == 200, response.text
    assert await Mailbox(disk).pending(wid, "mounted") == [response.json()["event_id"]]


async def test_a_deeply_nested_body_is_a_400(
    client: httpx.AsyncClient, wid: str, disk: Storage
) -> None:
    deep = "[" * 20_000 + "]" * 20_000
    headers = {**AUTH, "content-type": "application/json"}
    response = await client.post(f"/workflows/{wid}/events/k", content=deep, headers=headers)
    assert response.status_code == 400, response.text
    assert "nested" in response.json()["error"]


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="token"):
        make_app(token="")


def test_http_listener_is_a_plugin() -> None:
    assert plugins.load(plugins.LISTENER_GROUP, "http") is HTTPListener


# -- the listener ---------------------------------------------------------------------


async def test_http_listener_end_to_end(client: httpx.AsyncClient, disk: Storage, wid: str) -> None:
    ctx = EventContext(wid, "wait_for_approval", disk, VirtualClock(), Mailbox(disk))
    with use_context(ctx):
        poll = asyncio.create_task(HTTPListener().poll_for_event("approval"))
    await asyncio.sleep(0.05)
    assert not poll.done()
    response = await client.post(f"/workflows/{wid}/events/approval", json="yes", headers=AUTH)
    assert response.status_code == 200
    event = await asyncio.wait_for(poll, 10)
    assert event == "yes"
    # After the engine checkpointed the output: the event leaves the mailbox.
    with use_context(ctx):
        await HTTPListener().event_checkpointed(event)
    assert await Mailbox(disk).pending(wid, "approval") == []


async def test_http_listener_key_defaults_to_the_task_id(disk: Storage, wid: str) -> None:
    ctx = EventContext(wid, "get_message", disk, VirtualClock(), Mailbox(disk))
    await Mailbox(disk).send(wid, "get_message", "by task id")
    with use_context(ctx):
        assert await asyncio.wait_for(HTTPListener().poll_for_event(), 10) == "by task id"


class TestHTTPListenerConformance(ListenerConformance):
    listener = HTTPListener

    def arguments(self, ctx: EventContext) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), {"event_key": "approval"}

    async def trigger(
        self, ctx: EventContext, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        await ctx.mailbox.send(ctx.workflow_id, kwargs["event_key"], {"approved": True})

    def check_event(self, ctx: EventContext, event: Any) -> None:
        assert event == {"approved": True}


def test_make_app_imports_lazily(tmp_path: Path) -> None:
    # The module imports without touching Starlette; only make_app needs it.
    import subprocess
    import sys

    code = (
        "import sys; import ray_workflows.listeners.http as h; "
        "assert 'starlette' not in sys.modules, sorted(m for m in sys.modules if 'starl' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def mailbox_sender(mailbox: Mailbox) -> SendEvent:
    async def send(workflow_id: str, key: str, payload: Any, *, event_id: str | None = None) -> str:
        return await mailbox.send(workflow_id, key, payload, event_id=event_id)

    return send


async def test_a_full_mailbox_is_429_until_the_workflow_takes_an_event(
    disk: Storage, wid: str
) -> None:
    mailbox = Mailbox(disk, limit=2)
    transport = httpx.ASGITransport(app=make_app(send=mailbox_sender(mailbox), token=TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:

        async def post(key: str, payload: Any, event_id: str) -> httpx.Response:
            headers = {**AUTH, "Idempotency-Key": event_id}
            return await c.post(f"/workflows/{wid}/events/{key}", json=payload, headers=headers)

        assert (await post("a", 1, "e1")).status_code == 200
        assert (await post("b", 2, "e2")).status_code == 200
        full = await post("a", 3, "e3")
        assert full.status_code == 429, full.text
        assert full.headers["Retry-After"] == "1"
        assert wid in full.json()["error"] and disk.uri not in full.text
        assert await mailbox.pending(wid, "a") == ["e1"]  # e3 was not stored
        # A retry of an event already stored is answered as before, full or not.
        again = await post("a", 1, "e1")
        assert again.status_code == 200 and again.json()["event_id"] == "e1"
        assert (await post("a", 99, "e1")).status_code == 409
        # The workflow consumes one (claimed, checkpointed): there is room again.
        assert await mailbox.claim(wid, "b", "task-1") == ("e2", 2)
        assert (await post("a", 3, "e3")).status_code == 429  # claimed is still held
        assert await mailbox.acknowledge_task(wid, "task-1")
        assert (await post("a", 3, "e3")).status_code == 200
        assert await mailbox.pending(wid, "a") == ["e1", "e3"]


async def test_a_full_mailbox_is_seen_by_another_process(disk: Storage, wid: str) -> None:
    # The count starts from the storage: events stored by another sender count.
    for n in range(3):
        await Mailbox(disk).send(wid, "k", n, event_id=f"old-{n}")
    mailbox_counts.counts.forget((disk.uri, wid))  # as in a process that never sent
    with pytest.raises(MailboxFullError, match="holds 3 events"):
        await Mailbox(disk, limit=3).send(wid, "k", "new")
    assert await Mailbox(disk).held(wid) == 3


async def test_a_storage_failure_that_may_pass_is_503_and_another_is_500(
    tmp_path: Path, wid: str
) -> None:
    control = tmp_path / "faults.json"
    faulty = storage_module.open_storage(faulty_uri(tmp_path / "inner", control))
    await faulty.put(f"workflows/{wid}/meta.json", b'{"status": "RUNNING"}')
    transport = httpx.ASGITransport(app=make_app(send=storage_sender(faulty), token=TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        url = f"/workflows/{wid}/events/k"
        control.write_text(json.dumps({"fail": "mailbox/", "transient": True}))
        unavailable = await c.post(url, json=1, headers=AUTH)
        assert unavailable.status_code == 503, unavailable.text
        assert unavailable.headers["Retry-After"] == "1"
        control.write_text(json.dumps({"fail": "mailbox/"}))
        os.utime(control, (time.time() + 5, time.time() + 5))  # a new mtime, surely
        refused = await c.post(url, json=1, headers=AUTH)
        assert refused.status_code == 500, refused.text
        assert "Retry-After" not in refused.headers
        assert str(tmp_path) not in refused.text
        control.unlink()
        assert (await c.post(url, json=1, headers=AUTH)).status_code == 200


async def test_a_file_storage_that_cannot_hold_the_mailbox_is_500_not_503(
    disk: Storage, wid: str
) -> None:
    # A file where the mailbox's directory must be: no retry will get past it.
    await disk.put(f"workflows/{wid}/mailbox", b"in the way")
    transport = httpx.ASGITransport(app=make_app(send=storage_sender(disk), token=TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        refused = await c.post(f"/workflows/{wid}/events/k", json=1, headers=AUTH)
    assert refused.status_code == 500, refused.text
    assert "Retry-After" not in refused.headers
    assert disk.uri not in refused.text
