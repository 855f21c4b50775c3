"""Real, separate Ray clusters for crash tests: ``ray start --block`` nodes and driver
scripts run as subprocesses, each in a process session of its own, so a test can
SIGKILL a whole node (or driver) and nothing else.

Isolation from the test session's own Ray (``address="local"``) and from other
clusters: every cluster has its own short root directory under /tmp (Ray limits
socket path lengths), every node its own ``--temp-dir`` and free ports, and the
drivers connect with an explicit address (``RAY_AUTH_MODE=token``) or with
``address="auto"`` and ``RAY_TMPDIR`` pointing at their cluster's head directory,
so they never see a ``ray_current_cluster`` file of another Ray.

Nothing here uses ``ray stop`` or kills by name: a node is killed through the
process group it was started in, plus the processes descending from it (Ray puts
its workers in process groups of their own), collected before the kill. Every
process of a cluster also carries ``RWF_CLUSTER=<its root>`` in its environment:
``Cluster.kill``/``shutdown`` finish with the ones still alive, and only those.

Drivers are Python scripts written by ``write_script`` (``PRELUDE`` first) that
print their findings as one ``RESULT {json}`` line. Set ``RWF_KEEP_CLUSTERS=1`` to
keep the clusters' directories (Ray logs) after the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
BIN_DIR = Path(sys.executable).parent
RAY = str(BIN_DIR / "ray")
# Seconds, RAY_WORKFLOWS_LEASE_TTL in every cluster and driver (RWF_LEASE_TTL to try
# another): short, so a restarted cluster takes over a dead manager's workflows soon.
LEASE_TTL = int(os.environ.get("RWF_LEASE_TTL", "2"))
START_ATTEMPTS = 5  # of a node whose raylet aborted while starting (see wait_ready)

#: Environment variables that would point a subprocess at another Ray or storage.
_SCRUBBED = (
    "RAY_ADDRESS",
    "RAY_NAMESPACE",
    "RAY_JOB_CONFIG_JSON_ENV_VAR",
    "RAY_RUNTIME_ENV",
    "RAY_WORKFLOWS_STORAGE",
    "RAY_WORKFLOW_STORAGE",
    "RAY_WORKFLOWS_AUTO_RESUME",
    "RAY_TMPDIR",
    "PYTHONBREAKPOINT",  # set by the test session's ray.init
)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (held open together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_WORKFLOWS_LEASE_TTL=str(LEASE_TTL),
        PYTHONPATH=os.pathsep.join(
            p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
        ),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _proc_table() -> dict[int, int]:
    """pid -> parent pid, for every process visible in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = int(fields[1])
    return table


def descendants(pid: int) -> set[int]:
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, parent in table.items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def marked(marker: str) -> set[int]:
    """Processes whose environment holds ``RWF_CLUSTER=marker``: every process a
    cluster started (nodes, their workers, drivers), even one re-parented after its
    parent died."""
    needle = f"\0RWF_CLUSTER={marker}\0".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in b"\0" + Path("/proc", entry, "environ").read_bytes() + b"\0":
                    found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] not in "ZX"  # a zombie is dead


def kill_tree(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Kill a process started with ``start_new_session=True``: its process group and
    every process descending from it (collected first: once the parents die, the
    orphans are re-parented and could no longer be found)."""
    pids = descendants(proc.pid) if proc.poll() is None else set()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def poll_until(
    predicate: Callable[[], bool],
    what: str,
    timeout: float,
    *,
    alive: Iterable[subprocess.Popen[bytes]] = (),
    details: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` s, or at once
    if one of the ``alive`` processes exits first."""
    watched = list(alive)
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in watched:
            if proc.poll() is not None and not predicate():
                raise AssertionError(
                    f"process {proc.args!r} exited ({proc.returncode}) while waiting for "
                    f"{what}\n{details()}"
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{details()}")
        time.sleep(0.1)


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<{path}: missing>"
    return f"--- {path} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])


@dataclasses.dataclass(eq=False)
class Node:
    head: bool
    num_cpus: int
    resources: dict[str, float]
    proc: subprocess.Popen[bytes] = dataclasses.field(init=False)
    temp_dir: Path = dataclasses.field(init=False)  # the node's --temp-dir
    log: Path = dataclasses.field(init=False)
    attempts: int = 0

    @property
    def name(self) -> str:
        return self.temp_dir.parent.name

    @property
    def address_file(self) -> Path:
        return self.temp_dir / "ray_current_cluster"

    def ready(self) -> bool:
        return self.address_file.exists()

    def raylet_crashed(self) -> bool:
        """The raylet aborted (a fatal ``C`` line in its log): ``ray start`` itself
        would notice only after a 30 s timeout."""
        for log in self.temp_dir.glob("session_2*/logs/raylet.out"):
            with contextlib.suppress(OSError), open(log, errors="replace") as f:
                if any("(raylet)" in line and " C " in line[:40] for line in f):
                    return True
        return False

    def alive(self) -> bool:
        return self.proc.poll() is None


class Cluster:
    """One Ray cluster of ``ray start --block`` nodes on this machine."""

    def __init__(self, label: str = "c") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"rwf-{label}-", dir="/tmp"))
        self.nodes: list[Node] = []
        self.drivers: list[subprocess.Popen[bytes]] = []
        self.head: Node | None = None
        self._count = 0  # nodes launched so far (names n0, n1, ...)

    # -- nodes ---------------------------------------------------------------------
    def _launch(self, node: Node) -> None:
        """(Re)start ``node``'s ``ray start`` process, with a fresh temp dir and ports."""
        name = f"n{self._count}"
        self._count += 1
        # The head's temp dir is ROOT/nX/ray, so that RAY_TMPDIR=ROOT/nX makes
        # address="auto" find exactly this cluster's ray_current_cluster file.
        node.temp_dir = self.root / name / "ray"
        node.temp_dir.mkdir(parents=True)
        (gcs, node_manager, object_manager, agent_http, agent_grpc, runtime_env, metrics) = (
            free_ports(7)
        )
        cmd = [RAY, "start", "--block"]
        if node.head:
            cmd += ["--head", f"--port={gcs}", "--include-dashboard=false"]
        else:
            cmd += [f"--address={self.address}"]
        cmd += [
            f"--num-cpus={node.num_cpus}",
            f"--temp-dir={node.temp_dir}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--object-store-memory=100000000",
            "--include-log-monitor=false",
            "--disable-usage-stats",
            "--log-style=record",
            "--log-color=false",
        ]
        if node.resources:
            cmd.append(f"--resources={json.dumps(node.resources)}")
        node.log = self.root / f"{name}.log"
        with open(node.log, "wb") as out:
            node.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=base_env(RAY_TMPDIR=str(node.temp_dir.parent), RWF_CLUSTER=str(self.root)),
                cwd=self.root,
                start_new_session=True,
            )
        node.attempts += 1

    def _start_node(
        self, head: bool, num_cpus: int, resources: dict[str, float] | None, wait: bool
    ) -> Node:
        node = Node(head=head, num_cpus=num_cpus, resources=dict(resources or {}))
        if head:
            self.head = node
        self._launch(node)
        self.nodes.append(node)
        if wait:
            self.wait_ready(node)
        return node

    def start_head(
        self, num_cpus: int = 2, resources: dict[str, float] | None = None, wait: bool = True
    ) -> Node:
        """Start the head; with ``wait=False`` return at once (``wait_ready`` later)."""
        assert self.head is None
        return self._start_node(True, num_cpus, resources, wait)

    def add_node(
        self, num_cpus: int = 1, resources: dict[str, float] | None = None, wait: bool = True
    ) -> Node:
        """Start a worker node joining the head (ready, if ``wait``)."""
        assert self.head is not None, "start the head first"
        self.wait_ready(self.head)
        return self._start_node(False, num_cpus, resources, wait)

    def wait_ready(self, *nodes: Node | None, timeout: float = 120) -> None:
        """Wait until the nodes run. On a loaded machine a raylet may give up waiting
        for its (slow to import) dashboard agent and abort: such a node is started
        again, up to ``START_ATTEMPTS`` times in all."""
        for node in nodes:
            assert node is not None
            while not node.ready():
                try:
                    poll_until(
                        lambda n=node: n.ready() or n.raylet_crashed(),  # type: ignore[misc]
                        f"Ray node {node.name} to start",
                        timeout,
                        alive=[node.proc],
                        details=self.logs,
                    )
                except AssertionError as exc:
                    failure = str(exc)
                else:
                    if node.ready():
                        break
                    failure = f"the raylet of Ray node {node.name} aborted\n{self.logs()}"
                kill_tree(node.proc)
                if node.attempts >= START_ATTEMPTS:
                    raise AssertionError(failure)
                self._launch(node)

    @property
    def address(self) -> str:
        assert self.head is not None
        self.wait_ready(self.head)
        return self.head.address_file.read_text().strip()

    def kill_node(self, node: Node) -> None:
        """SIGKILL the node: ``ray start``, GCS/raylet and the rest of its process
        group, and its workers (they are in process groups of their own)."""
        kill_tree(node.proc)

    def kill(self) -> None:
        """The whole cluster dies at once: every node (worker nodes first, so none
        outlives the head), then anything else of this cluster's still alive (say,
        workers of a node whose `ray start` had died on its own, re-parented out of
        reach of kill_tree, or drivers)."""
        for node in reversed(self.nodes):
            kill_tree(node.proc)
        leftovers = marked(str(self.root))
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in leftovers) and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- drivers -------------------------------------------------------------------
    def driver_env(self, **extra: str) -> dict[str, str]:
        assert self.head is not None
        return base_env(
            RAY_TMPDIR=str(self.head.temp_dir.parent),
            RWF_ADDRESS=self.address,
            RWF_CLUSTER=str(self.root),
            **extra,
        )

    def spawn(self, script: Path, *, env: dict[str, str] | None = None) -> Driver:
        """Start a driver script (in a session of its own); its output goes to files."""
        out = script.with_suffix(f".{len(self.drivers)}.out")
        err = script.with_suffix(f".{len(self.drivers)}.err")
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(
                [sys.executable, str(script)],
                stdin=subprocess.DEVNULL,
                stdout=o,
                stderr=e,
                env={**self.driver_env(), **(env or {})},
                cwd=script.parent,
                start_new_session=True,
            )
        self.drivers.append(proc)
        return Driver(proc, out, err, self)

    def run(self, script: Path, *, env: dict[str, str] | None = None, timeout: float = 240) -> dict:
        """Run a driver script to its end; return the JSON it printed as ``RESULT {...}``."""
        driver = self.spawn(script, env=env)
        return driver.result(timeout)

    def logs(self) -> str:
        parts = [tail(node.log, 20) for node in self.nodes]
        for node in self.nodes:
            for name in ("raylet.err", "gcs_server.err"):
                for path in sorted(node.temp_dir.glob(f"session_2*/logs/{name}")):
                    if path.stat().st_size:
                        parts.append(tail(path, 15))
            for path in sorted(node.temp_dir.glob("session_2*/logs/worker-*.err")):
                text = path.read_text(errors="replace")
                if "WorkflowManager" in text or "Traceback" in text:
                    parts.append(tail(path, 80))
        return "\n".join(parts)

    def shutdown(self) -> None:
        for proc in self.drivers:
            if proc.poll() is None:
                kill_tree(proc)
        self.kill()
        if not os.environ.get("RWF_KEEP_CLUSTERS"):
            shutil.rmtree(self.root, ignore_errors=True)


@dataclasses.dataclass
class Driver:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    cluster: Cluster

    def output(self) -> str:
        return f"{tail(self.out)}\n{tail(self.err)}"

    def result(self, timeout: float = 240) -> dict:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc)
            raise AssertionError(
                f"driver {self.proc.args!r} still running after {timeout} s\n{self.output()}\n"
                f"{self.cluster.logs()}"
            ) from None
        lines = [ln for ln in self.out.read_text().splitlines() if ln.startswith("RESULT ")]
        if self.proc.returncode != 0 or not lines:
            raise AssertionError(
                f"driver {self.proc.args!r} failed (exit {self.proc.returncode})\n"
                f"{self.output()}\n{self.cluster.logs()}"
            )
        return json.loads(lines[-1][len("RESULT ") :])

    def wait_file(self, path: Path, timeout: float = 180) -> None:
        poll_until(path.exists, f"{path}", timeout, alive=[self.proc], details=self.output)

    def kill(self) -> None:
        kill_tree(self.proc)


#: The start of every driver script: connecting, counting task executions through
#: files, and handshakes. Task functions are defined in the script's ``__main__``, so
#: cloudpickle ships them (and these helpers) by value to any cluster.
PRELUDE = textwrap.dedent(
    '''\
    import json
    import os
    import sys
    import time
    import uuid
    from pathlib import Path

    import ray

    import ray_workflows as workflow

    ADDRESS = os.environ.get("RWF_ADDRESS", "auto")


    def connect(address=None):
        ray.init(address=address or ADDRESS, log_to_driver=False)


    def record(runs, name, **info):
        """One file per execution of task ``name`` (see tests/helpers.py count_runs)."""
        info.update(pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id())
        path = Path(runs, f"{name}.{os.getpid()}.{uuid.uuid4().hex}")
        path.write_text(json.dumps(info))


    def wait_file(path, timeout=600.0):
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {path} after {timeout} s")
            time.sleep(0.05)


    def wait_started(runs, name, timeout=240.0):
        """Wait until task ``name`` has recorded a run in ``runs``."""
        deadline = time.monotonic() + timeout
        while not any(p.name.startswith(name + ".") for p in Path(runs).iterdir()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not start in {timeout} s")
            time.sleep(0.05)


    def emit(**result):
        print("RESULT " + json.dumps(result, default=str), flush=True)

    '''
)


def write_script(directory: Path, name: str, *parts: str) -> Path:
    """Write ``PRELUDE`` and the ``parts`` (each dedented) as ``directory/name.py``."""
    path = directory / f"{name}.py"
    path.write_text("\n".join([PRELUDE, *(textwrap.dedent(part) for part in parts)]))
    return path


def runs_of(directory: Path, name: str) -> list[dict]:
    """The records of every execution of task ``name`` (as ``record`` wrote them)."""
    return [
        json.loads(p.read_text())
        for p in sorted(directory.iterdir())
        if p.name.startswith(name + ".")
    ]


__all__ = [
    "LEASE_TTL",
    "PRELUDE",
    "Cluster",
    "Driver",
    "Node",
    "base_env",
    "descendants",
    "free_ports",
    "kill_tree",
    "poll_until",
    "runs_of",
    "write_script",
]
