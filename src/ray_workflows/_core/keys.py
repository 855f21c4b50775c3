"""Every storage key, named in one place: the layout of a workflow storage.

Layout (all keys relative to the storage URI)::

    workflows/<wid>/plan                  entry plan (the commit point of a new workflow)
    workflows/<wid>/meta.json             status, user metadata, start/end time, error
                                          (absent until the first status change of a
                                          workflow its caller stored: the plan's header
                                          holds it, see store.WorkflowStore.started_meta)
    workflows/<wid>/lease                 which manager runs it, until when (lease.py)
    workflows/<wid>/tasks/<E>/<tid>.out   a task's committed output (its existence = done)
    workflows/<wid>/tasks/<E>/<tid>.pack  several small outputs committed in one write, named
                                          after the first task in it (membership = done)
    workflows/<wid>/tasks/<E>/<tid>.cont  the continuation plan the task returned
    workflows/<wid>/tasks/<E>/<tid>.latest  newest continuation of the chain rooted here
    workflows/<wid>/tasks/<E>/<tid>.deadline  an event task's timeout, in epoch seconds
    workflows/<wid>/tasks/<E>/<tid>.tries  how many attempts of the task failed so far
    workflows/<wid>/tasks/<E>/<tid>.unacked   an event task's committed event, not yet
                                          acknowledged to its listener
    workflows/<wid>/tasks/<E>/ids.json    task-id counters (continuations name their tasks)
    workflows/<wid>/seals/<E>             the records of epochs before E that count (JSON)
    workflows/<wid>/objects/<sha256>      checkpointed ObjectRef values
    workflows/<wid>/actor-run             a nonce naming the run of the workflow, which
                                          scopes its virtual-actor step calls (actors.py)
    workflows/<wid>/mailbox/keys/<key>/events/<name>   an event, until acknowledged
    workflows/<wid>/mailbox/keys/<key>/claims/<name>   the id of the task that claimed it
    workflows/<wid>/mailbox/keys/<key>/ids/<event_id>  dedupe record of a sender-chosen id
    workflows/<wid>/mailbox/tasks/<task_id>            "<key>/<name>" of the event it holds
    status/<STATUS>/<wid>                 empty marker: the status index for list_all
    cancels/<wid>                         a request to stop the workflow, for the runner
                                          that holds its lease (engine.Engine.cancel)
    actors/<id>/class                     a virtual actor's class and __init__ arguments
    actors/<id>/state                     the state after n writer calls: {"seq": n, "state": ...}
                                          (JSON), or a pickled envelope with seq (actor_state.py)
    actors/<id>/calls/<seq>               writer call number seq, logged before it runs
    actors/<id>/ids/<call>                the seq of a call id (a replayed call runs once)
    actors/<id>/results/<seq>             the call's result, written before the state
    actors/<id>/objects/<sha256>          checkpointed ObjectRef values of a pickled state
    packages/<sha256>.zip                 a runtime_env code package (working_dir, py_modules)
                                          its workflows recorded, named after its content
                                          (environment.py); shared, never deleted
    managers/<lineage>probe               a token a manager wrote, which a caller reads back
                                          to learn that it sees the same storage

``<E>`` is the epoch of the lease its writer held (fencing: see :mod:`ray_workflows._core.store`);
a mailbox event's ``<name>`` is ``<micros>-<event_id>`` (see events.Mailbox);
``<seq>`` is 12 digits, so that calls list in order; ``<lineage>`` is the manager's
(:func:`ray_workflows._core.incarnation.lineage`). Everything under ``workflows/<wid>/`` is
deleted with the workflow.

An output is addressed by a *record ref*: its ``out`` key, or
``<pack key>/<task id>`` for a member of a pack (task ids never contain ``/``).

This module imports nothing of the package but :mod:`ray_workflows.storage`, so that
every other module can use it.
"""

from __future__ import annotations

import hashlib

from ray_workflows.storage import check_key

# -- workflows ---------------------------------------------------------------------

IDS = "ids.json"  # the task-id counters' name in tasks/<E>/
STATUS_PREFIX = "status/"


def wf_prefix(wid: str) -> str:
    """Everything of one workflow (but its status marker) is under this prefix."""
    return f"workflows/{wid}/"


def plan_key(wid: str) -> str:
    return f"workflows/{wid}/plan"


def meta_key(wid: str) -> str:
    return f"workflows/{wid}/meta.json"


def lease_key(wid: str) -> str:
    """The lease record; checked, so a workflow id that cannot be a key is refused."""
    return check_key(f"workflows/{wid}/lease")


def tasks_prefix(wid: str) -> str:
    return f"workflows/{wid}/tasks/"


def task_key(wid: str, tid: str, record: str, epoch: int) -> str:
    # Flat per epoch: every record a holder writes in one directory, so a task's output
    # costs one file and one directory sync, not a new directory per task.
    return f"workflows/{wid}/tasks/{epoch}/{tid}.{record}"


def ids_key(wid: str, epoch: int) -> str:
    return f"workflows/{wid}/tasks/{epoch}/{IDS}"


def parse_task_key(wid: str, key: str) -> tuple[int, str, str] | None:
    """``(epoch, task id, record)`` of a key listed under :func:`tasks_prefix`; for the
    counters, ``(epoch, "", IDS)``; ``None`` for a key that is no record (a stray one)."""
    epoch_text, _, name = key[len(tasks_prefix(wid)) :].partition("/")
    if not epoch_text.isdigit() or not name:
        return None
    if name == IDS:
        return int(epoch_text), "", IDS
    tid, _, record = name.rpartition(".")
    return int(epoch_text), tid, record


def seals_prefix(wid: str) -> str:
    return f"workflows/{wid}/seals/"


def seal_key(wid: str, epoch: int) -> str:
    return f"workflows/{wid}/seals/{epoch}"


def seal_epoch(wid: str, key: str) -> int:
    """The epoch of a key listed under :func:`seals_prefix`."""
    return int(key[len(seals_prefix(wid)) :])


def objects_prefix(wid: str) -> str:
    """Checkpointed objects: the key of one is this prefix and its sha256 in hex."""
    return f"workflows/{wid}/objects/"


def actor_run_key(wid: str) -> str:
    """The nonce of a workflow's run, which scopes the call ids of its actor method
    steps: deleting it makes the next run of the workflow call them anew."""
    return f"workflows/{wid}/actor-run"


def status_key(status: str, wid: str) -> str:
    """The workflow's marker in the status index (``status`` is the enum's value)."""
    return f"{STATUS_PREFIX}{status}/{wid}"


def parse_status_key(key: str) -> tuple[str, str]:
    """``(status, wid)`` of a key listed under :data:`STATUS_PREFIX`."""
    _, status, wid = key.split("/", 2)
    return status, wid


CANCELS_PREFIX = "cancels/"


def cancel_key(wid: str) -> str:
    """A request to stop ``wid``, which its runner, wherever it is, looks for."""
    return f"{CANCELS_PREFIX}{wid}"


# -- record refs -------------------------------------------------------------------


def pack_ref(pack_key: str, tid: str) -> str:
    return f"{pack_key}/{tid}"


def split_ref(ref: str) -> tuple[str, str | None]:
    """``(storage key, member)`` of a record ref; member is None for an ``out`` key."""
    head, _, tail = ref.rpartition("/")
    if head.endswith(".pack") and head.rsplit("/", 3)[-3] == "tasks":
        return head, tail
    return ref, None


# -- the mailbox -------------------------------------------------------------------


def mailbox_prefix(wid: str, key: str | None = None) -> str:
    """A workflow's mailbox, or one event key in it."""
    base = f"workflows/{wid}/mailbox/"
    return base if key is None else f"{base}keys/{key}/"


def mailbox_events_prefix(wid: str, key: str) -> str:
    return f"{mailbox_prefix(wid, key)}events/"


def mailbox_event_key(wid: str, key: str, name: str) -> str:
    return f"{mailbox_prefix(wid, key)}events/{name}"


def mailbox_claim_key(wid: str, key: str, name: str) -> str:
    return f"{mailbox_prefix(wid, key)}claims/{name}"


def mailbox_id_key(wid: str, key: str, event_id: str) -> str:
    return f"{mailbox_prefix(wid, key)}ids/{event_id}"


def mailbox_task_key(wid: str, task_id: str) -> str:
    return f"{mailbox_prefix(wid)}tasks/{task_id}"


# -- virtual actors ----------------------------------------------------------------


def actor_class_key(actor_id: str) -> str:
    return f"actors/{actor_id}/class"


def actor_state_key(actor_id: str) -> str:
    return f"actors/{actor_id}/state"


def actor_objects_prefix(actor_id: str) -> str:
    return f"actors/{actor_id}/objects/"


def actor_calls_prefix(actor_id: str) -> str:
    return f"actors/{actor_id}/calls/"


def actor_call_key(actor_id: str, seq: int) -> str:
    return f"actors/{actor_id}/calls/{seq:012d}"


def actor_call_seq(actor_id: str, key: str) -> int:
    """The seq of a key listed under :func:`actor_calls_prefix`."""
    return int(key[len(actor_calls_prefix(actor_id)) :])


def actor_id_key(actor_id: str, call_id: str) -> str:
    return f"actors/{actor_id}/ids/{call_id}"


def actor_result_key(actor_id: str, seq: int) -> str:
    return f"actors/{actor_id}/results/{seq:012d}"


# -- managers ----------------------------------------------------------------------


PACKAGES_PREFIX = "packages/"


def package_key(digest: str) -> str:
    """Where a runtime_env package whose SHA-256 is ``digest`` is kept."""
    return check_key(f"{PACKAGES_PREFIX}{digest}.zip")


def manager_probe_key(lineage: str) -> str:
    """One key per cluster and manager: each incarnation Ray restarts overwrites its
    predecessor's (another cluster sharing the storage has its own lineage)."""
    return f"managers/{lineage}probe"


def actor_sub_workflow_id(actor_id: str, seq: int) -> str:
    """The id of the sub-workflow that writer call ``seq`` of ``actor_id`` started."""
    wid = f"{actor_id}.call-{seq}"
    if len(wid) > 200 or actor_id.endswith("."):
        # Too long for a workflow id, or ".." at the seam (no id may hold ".."): the
        # actor is named by its digest instead.
        digest = hashlib.sha1(actor_id.encode()).hexdigest()[:16]
        wid = f"{actor_id[:150].rstrip('.')}.{digest}.call-{seq}"
    return wid


def actor_step_call_id(workflow_id: str, run: str, task_id: str, k: int) -> str:
    """The call id of attempt ``k`` of a workflow step's call to a virtual actor (the
    last part of its ``actors/<id>/ids/<call>`` key)."""
    scoped = f"step:{workflow_id}:{run}:{task_id}:{k}"
    if len(scoped) > 200:  # a storage key's last part: keep it short enough for a file name
        scoped = "step:" + hashlib.sha1(scoped.encode()).hexdigest()
    return scoped


__all__ = [
    "actor_step_call_id",
    "actor_sub_workflow_id",
    "CANCELS_PREFIX",
    "IDS",
    "PACKAGES_PREFIX",
    "STATUS_PREFIX",
    "actor_call_key",
    "actor_call_seq",
    "actor_calls_prefix",
    "actor_class_key",
    "actor_id_key",
    "actor_objects_prefix",
    "actor_result_key",
    "actor_run_key",
    "actor_state_key",
    "cancel_key",
    "ids_key",
    "lease_key",
    "mailbox_claim_key",
    "mailbox_event_key",
    "mailbox_events_prefix",
    "mailbox_id_key",
    "mailbox_prefix",
    "mailbox_task_key",
    "manager_probe_key",
    "meta_key",
    "objects_prefix",
    "pack_ref",
    "package_key",
    "parse_status_key",
    "parse_task_key",
    "plan_key",
    "seal_epoch",
    "seal_key",
    "seals_prefix",
    "split_ref",
    "status_key",
    "task_key",
    "tasks_prefix",
    "wf_prefix",
]
