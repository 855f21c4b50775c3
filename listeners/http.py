"""The ``http`` listener, and the ASGI application that receives its events.

A workflow waits with ``wait_for_event(HTTPListener, "approval")``; a client
sends the event with ``POST /workflows/<workflow_id>/events/approval`` and a JSON
body, the payload. The answer, 200 with ``{"workflow_id", "key", "event_id"}``,
comes once the event is durably stored in the workflow's mailbox, whether or not
the workflow is waiting for it yet.

* ``Idempotency-Key: <id>`` (optional header) is the event id: a retried POST with
  the same key is delivered once.
* ``Authorization: Bearer <token>``: the app needs a token, and every request must
  carry it; an app without one is only made when asked for by name
  (``allow_unauthenticated=True``, which logs a warning).
* 400: the body is not JSON (or nested too deeply to read), or the workflow id, key
  or idempotency key is invalid; 401: missing or wrong token; 404: no such workflow;
  409: the workflow has finished (SUCCESSFUL or CANCELED) and will never wait again,
  or the ``Idempotency-Key`` was used before with another payload;
  413: the body is larger than ``max_body_bytes``; 429 with ``Retry-After``: the
  workflow's mailbox holds ``mailbox_limit`` events it has not consumed yet (a retry
  of an ``Idempotency-Key`` already stored is still a 200); 503 with ``Retry-After``:
  the storage failed in a way that may pass (a timeout, throttling, a server error);
  500: the storage refused (no permission, no such bucket or directory) or another
  error: retrying will not help until the server's operator fixes it.
  Error bodies never name the storage (its path or bucket): the details are logged.

Mount it in any Starlette or FastAPI application::

    app.mount("/hooks", make_app(token=os.environ["HOOK_TOKEN"]))

or run it on its own (needs ``pip install 'ray-workflows[http]'``)::

    RAY_WORKFLOWS_HTTP_TOKEN=secret python -m ray_workflows.listeners.http \\
        --storage /mnt/shared/workflows --port 8000
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ray_workflows._core.events import EventListener, current_context
from ray_workflows._core.ids import check_id
from ray_workflows._core.log import get_logger
from ray_workflows.exceptions import (
    EventConflictError,
    MailboxFullError,
    StorageError,
    TransientStorageError,
    WorkflowError,
    WorkflowFinishedError,
    WorkflowNotFoundError,
)

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse

log = get_logger()

#: The environment variable the standalone server reads its bearer token from.
TOKEN_ENV = "RAY_WORKFLOWS_HTTP_TOKEN"
_INSTALL = "pip install 'ray-workflows[http]'"
#: Seconds a client is asked to wait before it sends again (429 and 503).
RETRY_AFTER = "1"


class HTTPListener(EventListener):
    """Waits for an event sent to the workflow under ``event_key`` and returns its
    payload (by HTTP through :func:`make_app`, or by ``workflow.send_event``).

    The key defaults to the id of the waiting task, as in Ray 2.47. Each waiting
    task gets one event of its key, in arrival order; once the task's result is
    checkpointed the event is acknowledged and removed from the mailbox.
    """

    async def poll_for_event(self, event_key: str | None = None) -> Any:
        ctx = current_context()
        key = ctx.task_id if event_key is None else event_key
        _, payload = await ctx.mailbox.claim(ctx.workflow_id, key, ctx.task_id)
        return payload

    async def event_checkpointed(self, event: Any) -> None:
        ctx = current_context()
        await ctx.mailbox.acknowledge_task(ctx.workflow_id, ctx.task_id)


class SendEvent(Protocol):
    """The signature of ``ray_workflows.aio.send_event``: store an event, return its id."""

    def __call__(
        self, workflow_id: str, key: str, payload: Any, *, event_id: str | None = None
    ) -> Awaitable[str]: ...


async def _default_send(
    workflow_id: str, key: str, payload: Any, *, event_id: str | None = None
) -> str:
    from ray_workflows import aio

    event_id = await aio.send_event(workflow_id, key, payload, event_id=event_id)
    return str(event_id)


def make_app(
    *,
    send: SendEvent | None = None,
    token: str | None = None,
    max_body_bytes: int = 1 << 20,
    allow_unauthenticated: bool = False,
) -> Starlette:
    """The ASGI application (Starlette) that stores events sent by HTTP.

    ``send`` stores an event (default: ``ray_workflows.aio.send_event``, which
    needs ``workflow.init`` in this process); ``token`` is the bearer token every
    request must carry (compared in constant time). Without a token the app is made
    only if ``allow_unauthenticated`` says so: anyone who reaches it can then send
    events to any workflow.
    """
    try:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route
    except ImportError as exc:
        raise ImportError(
            f"The HTTP event endpoint needs Starlette and uvicorn: {_INSTALL}"
        ) from exc
    if token is not None and not (isinstance(token, str) and token):
        raise ValueError("token must be a non-empty string")
    if token is None and not allow_unauthenticated:
        raise ValueError(
            "make_app() needs a bearer token (make_app(token=...)); to accept events from "
            "anyone who can reach the app, pass allow_unauthenticated=True"
        )
    if token is None:
        log.warning("http.unauthenticated", note="anyone who reaches the app can send events")
    expected = token.encode() if token is not None else None
    sender: SendEvent = send or _default_send

    async def deliver(request: Request, workflow_id: str, key: str, payload: Any) -> JSONResponse:
        event_id = request.headers.get("idempotency-key")
        try:
            check_id(workflow_id, "workflow_id")
            check_id(key, "event key")
            if event_id is not None:
                check_id(event_id, "Idempotency-Key")
            stored = await sender(workflow_id, key, payload, event_id=event_id)
        except WorkflowNotFoundError:
            # Not its message: that names the storage.
            return _error(404, f"no workflow {workflow_id!r}")
        except (WorkflowFinishedError, EventConflictError) as exc:
            return _error(409, str(exc))
        except MailboxFullError:
            return _error(
                429,
                f"workflow {workflow_id!r} has too many events it has not consumed yet; "
                "retry later",
                headers={"Retry-After": RETRY_AFTER},
            )
        except TransientStorageError as exc:
            log.warning("http.storage_unavailable", workflow_id=workflow_id, error=str(exc))
            return _error(
                503,
                "the workflow storage is unavailable; retry",
                headers={"Retry-After": RETRY_AFTER},
            )
        except StorageError as exc:
            # Permanent (credentials, permissions, a missing bucket): a retry fails the same.
            log.error("http.storage_failed", workflow_id=workflow_id, error=str(exc))
            return _error(500, "the workflow storage refused the event; see the server's logs")
        except RecursionError:
            return _error(400, "the payload is nested too deeply")
        except (TypeError, ValueError) as exc:
            return _error(400, str(exc))
        except WorkflowError as exc:
            log.warning("http.event_failed", workflow_id=workflow_id, error=str(exc))
            return _error(500, "the event could not be stored")
        return JSONResponse({"workflow_id": workflow_id, "key": key, "event_id": stored})

    async def post_event(request: Request) -> JSONResponse:
        problem = _authorize(request, expected)
        if problem is None:
            parsed = await _read_json(request, max_body_bytes)
            if isinstance(parsed, JSONResponse):
                return parsed
            params = request.path_params
            return await deliver(request, params["workflow_id"], params["key"], parsed.value)
        return problem

    async def post_event_2_47(request: Request) -> JSONResponse:
        # Ray 2.47's HTTPEventProvider route and body, for migrating clients.
        problem = _authorize(request, expected)
        if problem is None:
            parsed = await _read_json(request, max_body_bytes)
            if isinstance(parsed, JSONResponse):
                return parsed
            body = parsed.value
            if not (isinstance(body, dict) and "event_key" in body and "event_payload" in body):
                return _error(400, 'the body must be {"event_key": ..., "event_payload": ...}')
            wid = request.path_params["workflow_id"]
            return await deliver(request, wid, body["event_key"], body["event_payload"])
        return problem

    return Starlette(
        routes=[
            Route("/workflows/{workflow_id}/events/{key}", post_event, methods=["POST"]),
            Route("/event/send_event/{workflow_id}", post_event_2_47, methods=["POST"]),
        ]
    )


class _Parsed:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _authorize(request: Request, expected: bytes | None) -> JSONResponse | None:
    if expected is None:
        return None
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected):
        return None
    return _error(
        401,
        "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def _read_json(request: Request, limit: int) -> _Parsed | JSONResponse:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return _error(413, f"the body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return _error(413, f"the body is larger than {limit} bytes")
    try:
        return _Parsed(json.loads(body))
    except RecursionError:
        return _error(400, "the body is nested too deeply")
    except ValueError as exc:
        return _error(400, f"the body must be a JSON document (the event payload): {exc}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ray_workflows.listeners.http``: serve :func:`make_app` with uvicorn."""
    parser = argparse.ArgumentParser(
        prog="python -m ray_workflows.listeners.http",
        description="Receive workflow events over HTTP. The bearer token, if any, is read "
        f"from the environment variable {TOKEN_ENV}.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument(
        "--storage", help="the workflows' storage URI, as for workflow.init (default: its default)"
    )
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help=f"serve without a token ({TOKEN_ENV} unset): anyone who reaches it can send events",
    )
    args = parser.parse_args(argv)
    token = os.environ.get(TOKEN_ENV) or None
    if token is None and not args.allow_unauthenticated:
        parser.exit(2, f"set {TOKEN_ENV} (the bearer token), or pass --allow-unauthenticated\n")
    try:
        import uvicorn
    except ImportError:
        parser.exit(2, f"uvicorn is not installed: {_INSTALL}\n")
    import ray_workflows

    ray_workflows.init(args.storage)
    app = make_app(token=token, allow_unauthenticated=args.allow_unauthenticated)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()


__all__ = ["TOKEN_ENV", "HTTPListener", "SendEvent", "main", "make_app"]
