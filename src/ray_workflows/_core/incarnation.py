"""Which Ray cluster a process belongs to, and the lineage of a manager's lease owners.

A manager's lease owner ids (:func:`ray_workflows._core.lease.new_owner_id`) start with its
*lineage* (:func:`lineage`): ``<cluster token>|<manager name>|``. Its engine takes over
at once any live lease whose owner has the same lineage but is not its own owner id
(``Engine(owner_prefix=...)``): that owner is an earlier incarnation of the same named
manager actor in the same cluster. Ray keeps at most one live actor of a name in a
namespace and restarts an actor only once the previous one is dead (its process exited,
or its node was declared dead, whose processes then stop), so that owner is dead:
recognised from the names alone, with no guessing from timeouts.

The cluster is named by :func:`cluster_token`, never by an address. Two clusters can
have the same GCS address string (Docker's default bridge address, identical pod ranges
in two Kubernetes clusters); had the address named them, each cluster's manager would
take the other's live leases at every sweep, and two runners would run one workflow.

The token is Ray's cluster id: random bytes the GCS draws when it first starts and
keeps in its internal KV (namespace ``cluster``, key ``ray_cluster_id``); every process
that connects gets a copy (``global_worker.node.cluster_id``, read without a call). A
cluster started anew (a new GCS, a fresh KV) has a new one. A head restarted with GCS
fault tolerance (its KV kept in Redis) keeps it: the same cluster, whose restarted
manager rightly takes over its predecessor's leases. A process without that copy (a Ray
Client driver) reads the same KV record. Only a Ray whose GCS keeps no such record makes
this module create its own token, once per cluster: random bytes written with
put-if-absent to the KV (namespace ``ray_workflows``, key ``cluster_token``) and read
back, so every process of the cluster gets the one that won.

Example::

    prefix = lineage(manager_name(storage_uri))   # "9b1f...e3|manager-4c2a...|"
    engine = Engine(storage, owner_prefix=prefix)
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import ray

from ray_workflows._core import cluster_kv
from ray_workflows._core.log import get_logger

#: Ray's own record of the cluster id in the GCS KV (written by the GCS at its first start).
RAY_CLUSTER_ID_NAMESPACE = "cluster"
RAY_CLUSTER_ID_KEY = b"ray_cluster_id"
#: This module's own token, where Ray keeps no cluster id.
TOKEN_NAMESPACE = "ray_workflows"
TOKEN_KEY = b"cluster_token"
#: Separates the parts of a lineage; no part may contain it (see :func:`lineage`).
SEPARATOR = "|"

log = get_logger()


#: The Ray namespace of the managers' named actors.
NAMESPACE = "ray_workflows"


def manager_name(storage_uri: str) -> str:
    """The name of the manager actor of one storage, in :data:`NAMESPACE`."""
    return "manager-" + hashlib.sha1(storage_uri.encode()).hexdigest()[:16]


def cluster_token() -> str:
    """A token (lowercase hex) naming the running Ray cluster this process is connected
    to: the same in every driver, task and actor of that cluster and at every call, and
    different for any other cluster, whatever its address. Raises ``RuntimeError`` when
    Ray is not initialised."""
    if not ray.is_initialized():
        raise RuntimeError("cluster_token() needs a connected Ray (ray.init first)")
    token = _connected_cluster_id()
    if token is None:
        token = _stored_cluster_id()
    if token is None:
        token = _own_token()
    return token


def lineage(manager: str, token: str | None = None) -> str:
    """The owner prefix of the manager named ``manager`` in the cluster ``token``
    (default: :func:`cluster_token`): ``<token>|<manager>|``.

    Neither part may contain ``|`` or be empty, so two lineages share a prefix only if
    both parts are equal: ``startswith(lineage)`` matches exactly the owners of that
    manager in that cluster (host names in owner ids cannot contain it either, see
    :func:`ray_workflows._core.lease.new_owner_id`)."""
    token = cluster_token() if token is None else token
    for name, part in (("token", token), ("manager", manager)):
        if not part or SEPARATOR in part:
            raise ValueError(
                f"a lineage's {name} must be non-empty, without {SEPARATOR!r}: {part!r}"
            )
    return f"{token}{SEPARATOR}{manager}{SEPARATOR}"


def _connected_cluster_id() -> str | None:
    # The copy Ray handed this process when it connected; absent in a Ray Client driver.
    node: Any = getattr(ray._private.worker.global_worker, "node", None)
    cluster_id: Any = getattr(node, "cluster_id", None)
    try:
        token = None if cluster_id is None or cluster_id.is_nil() else cluster_id.hex()
    except AttributeError:  # not a ray.ClusterID: some other Ray; ask the KV instead
        return None
    return token if isinstance(token, str) and token else None


def _stored_cluster_id() -> str | None:
    raw = cluster_kv.read(RAY_CLUSTER_ID_NAMESPACE, RAY_CLUSTER_ID_KEY)
    if raw is None or not raw.strip(b"\0"):
        return None
    return raw.hex()


def _own_token() -> str:
    # Of racing processes the first write wins and all read it.
    raw, created = cluster_kv.claim(TOKEN_NAMESPACE, TOKEN_KEY, secrets.token_bytes(16))
    if created:
        log.info("incarnation.token_created", note="Ray keeps no cluster id: own token stored")
    return raw.hex()


__all__ = ["NAMESPACE", "manager_name", "SEPARATOR", "cluster_token", "lineage"]
