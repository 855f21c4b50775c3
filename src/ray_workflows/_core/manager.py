"""The manager: a detached, named, async Ray actor hosting an Engine.

One manager per storage URI (its name carries a hash of the URI), so two
storages can be used side by side in one cluster. ``num_cpus=0``: it schedules,
it does not compute. Detached, so workflows outlive the driver that started them
(on a cluster started with ``ray start``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import pickle
import secrets
from collections.abc import Awaitable
from typing import Any

import ray

from ray_workflows._core import host, incarnation, serialization, signing
from ray_workflows._core.actors import Actors
from ray_workflows._core.engine import Engine, load_clock
from ray_workflows._core.incarnation import NAMESPACE, manager_name
from ray_workflows._core.keys import manager_probe_key
from ray_workflows._core.log import get_logger
from ray_workflows._core.plan import Plan
from ray_workflows._core.settings import Settings
from ray_workflows._core.status import WorkflowStatus
from ray_workflows._core.store import WorkflowStore
from ray_workflows.exceptions import WorkflowError, WorkflowRunningElsewhereError

log = get_logger()


class ResolvingRef:
    """Returned by the manager in place of a value: unpickling it fetches the value
    behind the ref, so one ``ray.get`` (or ``await``) of the manager's reply yields
    the workflow's output in any process, without the output passing through the
    manager."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def __reduce__(self) -> Any:
        return (_fetch, (self.ref,))


def _fetch(ref: Any) -> Any:
    # A module-level function pickles by reference; ``ray.get`` itself is a wrapper
    # that cloudpickle would serialise by value in every reply.
    return ray.get(ref)


class InlineOutput:
    """Returned by the manager in place of a small output it holds as its checkpoint
    record (without ObjectRefs): unpickling decodes the record, so the caller gets the
    value in the reply itself, without fetching it from the manager in a second round
    trip. The value is the checkpointed one, as a resumed workflow returns it."""

    def __init__(self, record: bytes) -> None:
        self.record = record

    def __reduce__(self) -> Any:
        return (_decode, (self.record,))


def _decode(record: bytes) -> Any:
    _, payload = serialization.decode(record, "the workflow output")
    return serialization.loads(payload, [])


async def resolving(ref: Any) -> ResolvingRef:
    """Wrap ``ref`` once its value exists. Unpickling a ResolvingRef calls ``ray.get``
    inside Ray's own deserialisation, which deadlocks if the value is still being
    computed; waiting here (without fetching the value into the manager) avoids it.

    It polls rather than parking a thread in a blocking ``ray.wait``: a hundred
    callers waiting for their workflows would otherwise hold every thread of the
    default executor, and the file storage's durable writes would queue behind them.
    The output ref is nearly always ready already (it finished with its receipt)."""
    delay = 0.001
    while True:
        ready, _ = ray.wait([ref], num_returns=1, timeout=0, fetch_local=False)
        if ready:
            return ResolvingRef(ref)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


#: Allocations between two young-generation collections in the manager.
GC_THRESHOLD = 20_000


class WorkflowManager:
    """The manager of one storage, run with the settings of the driver that created it
    (``settings``): it reads no knob from its own environment."""

    def __init__(self, settings: Settings) -> None:
        # Leases of this manager's earlier incarnations in this cluster (Ray restarted
        # the actor, or a head with GCS fault tolerance came back) are taken over at once.
        # The cluster is named by its id (incarnation.cluster_token), never by its address:
        # another cluster at the same address string never matches.
        lineage = incarnation.lineage(manager_name(settings.storage))
        # Workers find the signing key where the manager publishes it (signing.py).
        signing.publish(settings.storage, settings.signing_key)
        self.engine = Engine(
            signing.engine_storage(settings.storage),
            owner_prefix=lineage,
            lease_ttl=settings.lease_ttl,
            clock=settings.clock,
        )
        self.engine.executor.use(settings)
        self.engine.admission.configure(
            settings.max_running_workflows, settings.max_pending_workflows
        )
        self.settings = settings
        self.actors = Actors(self.engine.storage, self._start_sub, self._sub_output)
        self._probe: tuple[str, bytes] | None = None  # see describe()
        self._lineage = lineage.replace(incarnation.SEPARATOR, ".")  # hex token, manager name
        self._recovering: asyncio.Task[list[str]] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Cancel requests for workflows running here, from managers elsewhere.
        self.engine.watch_cancels()
        if settings.auto_resume:
            # A (re)started manager resumes what its storage says was running: after a
            # cluster restart, or after this actor was killed and restarted. Later, it
            # keeps taking over workflows whose manager (another cluster) stopped.
            loop = asyncio.get_running_loop()
            self._recovering = loop.create_task(self._recover())
            self._sweeper = loop.create_task(self._sweep())
        self.engine.retention.keep(settings.retention)
        _tune_gc()

    async def _start_sub(self, workflow_id: str, plan: Plan) -> None:
        # Exempt from the admission limits: the task that called the method may hold
        # a running slot while it waits for this output. Durable when it returns.
        await self.engine.start(workflow_id, plan, exempt=True)

    async def _sub_output(self, workflow_id: str) -> Any:
        return await (await self.engine.result(workflow_id))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.engine.leases.ttl)
            try:
                await self.engine.resume_all()
            except Exception:
                log.exception("manager.sweep_failed")

    async def _recover(self) -> list[str]:
        try:
            resumed = await self.engine.resume_all()
        except Exception:
            log.exception("manager.recovery_failed")
            return []
        if resumed:
            log.info("manager.recovered", workflows=len(resumed))
        return resumed

    async def _recovered(self) -> None:
        if self._recovering is not None:
            await asyncio.shield(self._recovering)

    async def configure(self, settings: Settings) -> None:
        """Take the settings of a driver's ``workflow.init`` (sent also to a manager that
        already ran): its limits (those it gives), clock and placement knobs. The lease
        ttl and ``auto_resume`` stay as this manager started with them; limits and the
        retention not given stay as they are."""
        if settings.storage != self.settings.storage:
            raise ValueError(
                f"Settings for storage {settings.storage!r} sent to the manager of "
                f"{self.settings.storage!r}"
            )
        if settings.signing_key != self.settings.signing_key:
            theirs, mine = (repr(s.signing_key) for s in (settings, self.settings))
            raise ValueError(
                f"The manager of {settings.storage!r} runs with signing key {mine}, this "
                f"driver has {theirs}: give every driver the same RAY_WORKFLOWS_SIGNING_KEY."
            )
        max_running, max_pending = settings.max_running_workflows, settings.max_pending_workflows
        if max_running is not None or max_pending is not None:
            self.engine.admission.configure(max_running, max_pending)
        if settings.clock != self.settings.clock:
            self.engine.executor.clock = load_clock(settings.clock)
        # What is fixed when a manager starts stays, and so do limits not given.
        before = self.settings
        kept: dict[str, Any] = {"lease_ttl": before.lease_ttl, "auto_resume": before.auto_resume}
        for name in ("max_running_workflows", "max_pending_workflows", "retention"):
            if getattr(settings, name) is None:
                kept[name] = getattr(before, name)
        settings = dataclasses.replace(settings, **kept)
        self.engine.retention.keep(settings.retention)
        self.engine.executor.use(settings)
        self.settings = settings

    async def send_event(
        self, workflow_id: str, key: str, payload: Any, event_id: str | None
    ) -> str:
        await self._recovered()
        return await self.engine.send_event(workflow_id, key, payload, event_id)

    async def cancel(self, workflow_id: str) -> None:
        await self.engine.cancel(workflow_id)

    async def delete(self, workflow_id: str) -> None:
        await self._recovered()
        await self.engine.delete(workflow_id)

    async def delete_finished(self, older_than: float, statuses: tuple[str, ...]) -> list[str]:
        await self._recovered()
        return await self.engine.retention.delete_finished(older_than, statuses)

    async def resume_all(self, include_failed: bool) -> list[str]:
        await self._recovered()
        return await self.engine.resume_all(include_failed)

    async def ready(self) -> str:
        await self.engine.storage.check()
        return self.engine.storage.uri

    async def submit(self, workflow_id: str, plan: Plan | bytes, metadata: dict[str, Any]) -> None:
        """Store and start a workflow (or join/resume the one of that id). ``plan`` may
        come encoded as its stored record."""
        if isinstance(plan, bytes):
            encoded: bytes | None = plan
            plan = WorkflowStore.decode_plan(plan, f"the plan of {workflow_id!r}")
        else:
            encoded = None
        await self._joining(
            workflow_id, self.engine.start(workflow_id, plan, metadata, encoded=encoded)
        )

    async def describe(self) -> dict[str, Any]:
        """What a caller needs to store new workflows itself (see ``client.start``):
        the lease owner and ttl to grant, whether it may (a shared storage, and no
        pending-queue limit that could refuse a workflow), and a probe record the
        caller must read back from its own view of the storage before it does."""
        admission = self.engine.admission
        caller_stores = self.engine.storage.shared and (
            admission.max_running == -1 or admission.max_pending == -1
        )
        probe = None
        if caller_stores:
            if self._probe is None:
                key = manager_probe_key(self._lineage)
                self._probe = (key, secrets.token_hex(16).encode())
                await self.engine.storage.put(*self._probe)
            probe = self._probe
        return {
            "owner": self.engine.leases.owner,
            "ttl": self.engine.leases.ttl,
            "caller_stores": caller_stores,
            "probe": probe,
            # A hosted workflow is not counted by the running limit: only without one.
            "hosting": caller_stores and admission.max_running == -1,
            # What this manager runs with (see configure).
            "settings": self.settings,
        }

    async def run(self, call: bytes) -> ResolvingRef | InlineOutput:
        """Run a workflow its caller has stored as started; reply with its output.
        ``call`` is the pickled (workflow id, plan, meta, lease record or None): one
        argument costs Ray about half of what four do (see ``client.run_call``)."""
        workflow_id, plan, meta, lease = pickle.loads(call)
        decoded = WorkflowStore.decode_plan(plan, f"the plan of {workflow_id!r}")
        await self.engine.adopt(workflow_id, decoded, meta, lease)
        return await self.result(workflow_id)

    async def actor_create(
        self, actor_id: str, cls: bytes, init: bytes, options: dict[str, Any] | None = None
    ) -> None:
        await self.actors.create(actor_id, cls, init, options)

    async def actor_class(self, actor_id: str) -> bytes:
        return await self.actors.class_of(actor_id)

    async def actor_call(
        self,
        actor_id: str,
        call_id: str,
        method: str,
        call: bytes,
        readonly: bool,
        options: dict[str, Any],
        order: tuple[str, int] | None = None,
        step: str | None = None,
    ) -> Any:
        return await self.actors.call(
            actor_id, call_id, method, call, readonly, options, order, step
        )

    async def take_over(self, runs: list[tuple[str, str]]) -> int:
        """Resume at once the hosted workflows ``(workflow id, host owner)`` of a driver
        that is exiting (see ``host.hand_over_at_exit``): Ray ends their hosts with
        the driver. Returns how many were taken over."""
        taken = 0
        for wid, owner in runs:
            self.engine.leases.gone(owner)
            try:
                await self.engine.resume(wid, existing_ok=True, load=False)
                taken += 1
            except WorkflowError as exc:  # finished meanwhile, canceled, ...
                log.info("workflow.take_over_skipped", workflow_id=wid, error=str(exc))
        return taken

    async def resume(self, workflow_id: str) -> None:
        """Resume a stored workflow; joins it if it already runs (e.g. auto-recovered)."""
        await self._recovered()
        await self._joining(
            workflow_id, self.engine.resume(workflow_id, existing_ok=True, load=False)
        )

    async def _joining(self, workflow_id: str, started: Awaitable[Any]) -> None:
        """Await ``started`` (the engine starting or resuming ``workflow_id``). A run of
        that id in the Ray task that hosts it is joined instead, as a run here is:
        ``result()`` waits for it."""
        try:
            await started
        except WorkflowRunningElsewhereError:
            info = await self.engine.leases.holder(workflow_id)
            if info is None or not host.is_host(info.owner):
                raise

    async def result(self, workflow_id: str) -> ResolvingRef | InlineOutput:
        """The workflow's output, when it is done (resuming it if its manager died):
        the value itself if it is small and a run here made it while this call waited,
        else a ref to it (read from storage: another manager may have run the id since
        it last ran here)."""
        ref, record = await self.engine.result_and_record(workflow_id)
        return InlineOutput(record) if record is not None else await resolving(ref)

    async def get_output(self, workflow_id: str, task_id: str | None) -> ResolvingRef:
        return await resolving(await self.engine.output(workflow_id, task_id))

    async def get_status(self, workflow_id: str) -> WorkflowStatus:
        await self._recovered()
        return await self.engine.status(workflow_id)

    async def list_all(
        self, statuses: set[WorkflowStatus] | None
    ) -> list[tuple[str, WorkflowStatus]]:
        await self._recovered()
        found = await self.engine.list_all(statuses)
        # Virtual actors are listed as Ray 1.x listed them, each as a workflow whose id
        # is the actor's: RUNNING while a writer call runs, SUCCESSFUL otherwise.
        known = {wid for wid, _ in found}
        for actor_id, busy in sorted((await self.actors.running()).items()):
            status = WorkflowStatus.RUNNING if busy else WorkflowStatus.SUCCESSFUL
            if actor_id not in known and (statuses is None or status in statuses):
                found.append((actor_id, status))
        return found

    async def get_metadata(self, workflow_id: str, task_id: str | None) -> dict[str, Any]:
        return await self.engine.metadata(workflow_id, task_id)


def _tune_gc() -> None:
    """The manager allocates a few objects per task and keeps Ray's and its own
    long-lived ones: what exists once it is set up is frozen out of the collector's
    scans, and young collections run less often (the default, every 700 allocations,
    had the collector walk the same long-lived objects many times per workflow)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def actor_class() -> Any:
    return ray.remote(WorkflowManager)


__all__ = [
    "NAMESPACE",
    "InlineOutput",
    "ResolvingRef",
    "WorkflowManager",
    "actor_class",
    "manager_name",
]
