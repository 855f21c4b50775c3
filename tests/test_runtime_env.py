"""Dependencies: a workflow's runtime_env (the job's and each task's) is recorded at
submission, its code packages kept in the workflow storage, and every task of a
resumed run gets it, on a new cluster that never saw the original directory too."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import uuid
import zipfile
from pathlib import Path

import pytest
import ray
from clusters import Cluster, runs_of, write_script
from ray.experimental import internal_kv

import ray_workflows as workflow
from ray_workflows._core import client
from ray_workflows._core.settings import build
from ray_workflows._core.store import WorkflowStore


@ray.remote
def probe(name: str) -> dict[str, str | None]:
    import importlib

    found = {"var": os.environ.get("RWF_TEST_VAR")}
    try:
        found["module"] = importlib.import_module(name).VERSION
    except ImportError:
        found["module"] = None
    return found


def _package(module: str, version: str) -> tuple[str, bytes]:
    """A py_modules package, as Ray keeps one in the GCS: its URI and zip bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{module}/__init__.py", f"VERSION = {version!r}\n")
    data = buffer.getvalue()
    return f"gcs://_ray_pkg_{hashlib.sha1(data).hexdigest()[:16]}.zip", data


def test_get_metadata_shows_the_recorded_runtime_env(storage: str, wid: str) -> None:
    module = f"rwf_pkg_{uuid.uuid4().hex[:8]}"
    uri, data = _package(module, "v1")
    internal_kv._internal_kv_put(uri, data)
    env = {"env_vars": {"RWF_TEST_VAR": "task"}, "py_modules": [uri]}
    dag = probe.options(runtime_env=env, **workflow.options(task_id="probe")).bind(module)
    assert workflow.run(dag, workflow_id=wid) == {"var": "task", "module": "v1"}

    digest = hashlib.sha256(data).hexdigest()
    meta = workflow.get_metadata(wid)
    assert meta["runtime_env"] == {"job": {}, "packages": {uri: digest}}
    task = workflow.get_metadata(wid, "probe")
    assert task["task_options"]["ray_options"]["runtime_env"] == env
    # The package is kept once, named after its content, in the workflow storage.
    assert Path(storage, "packages", f"{digest}.zip").read_bytes() == data


@ray.remote
def fail_first(name: str, marker: str) -> str:
    import importlib

    version: str = importlib.import_module(name).VERSION
    if not os.path.exists(marker):
        Path(marker).touch()
        raise RuntimeError("first attempt")
    return version


def test_a_resume_puts_a_lost_package_back_from_storage(
    storage: str, wid: str, tmp_path: Path
) -> None:
    module = f"rwf_pkg_{uuid.uuid4().hex[:8]}"
    uri, data = _package(module, "v1")
    internal_kv._internal_kv_put(uri, data)
    task = fail_first.options(runtime_env={"py_modules": [uri]}, **workflow.options(max_retries=0))
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(task.bind(module, str(tmp_path / "failed")), workflow_id=wid)
    kept = Path(storage, "packages", f"{hashlib.sha256(data).hexdigest()}.zip")
    assert kept.read_bytes() == data

    # The package leaves the cluster (as it does with the cluster) and the storage.
    internal_kv._internal_kv_del(uri)
    kept.unlink()
    with pytest.raises(workflow.exceptions.WorkflowNotResumableError, match=uri):
        workflow.resume(wid)
    assert not internal_kv._internal_kv_exists(uri)

    kept.write_bytes(data)  # only the storage has it: enough
    assert workflow.resume(wid) == "v1"
    assert internal_kv._internal_kv_get(uri) == data


def test_pip_is_recorded_and_shown_as_given(storage: str) -> None:
    # Not run: this machine cannot install packages. What a new cluster would install
    # is what the record says, as given (pin versions to get the same code).
    env = {"pip": ["requests==2.31.0"], "env_vars": {"RWF_TEST_VAR": "x"}}
    node = probe.options(runtime_env=env, **workflow.options(task_id="probe")).bind("json")
    prepared = client.prepare(node, (), {}, "never-run", None)
    assert prepared.meta["runtime_env"] == {"job": {}, "packages": {}}
    plan = WorkflowStore.decode_plan(prepared.plan, "plan")
    assert plan.environment == prepared.meta["runtime_env"]
    recorded = plan.tasks["probe"].options.to_json()["ray_options"]["runtime_env"]
    # In Ray's own form of a pip list; Ray's bookkeeping keys left out.
    assert recorded == {
        "pip": {"packages": env["pip"], "pip_check": False},
        "env_vars": env["env_vars"],
    }
    assert type(recorded) is dict


def test_a_bad_runtime_env_setting_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_WORKFLOWS_RUNTIME_ENV", "newest")
    with pytest.raises(ValueError, match="RAY_WORKFLOWS_RUNTIME_ENV must be one of 'recorded'"):
        build("memory://")
    assert build("memory://", runtime_env="current").runtime_env == "current"


# -- a new cluster ------------------------------------------------------------------
MODES = ("recorded", "current")
GATE = 1  # step 0 finishes on the first cluster, step 1 is in flight when it dies
STEPS = 3

TASKS = f"""
STEPS, GATE = {STEPS}, {GATE}


@ray.remote
def step(x, i, runs, go):
    import shipped

    record(runs, f"seen{{i}}", module=shipped.VERSION, job=os.environ.get("RWF_JOB_VAR"),
           task=os.environ.get("RWF_TASK_VAR"), time=time.time())
    if i == GATE:
        wait_file(go)
    return x + 1


def chain(runs, go):
    node = 0
    for i in range(STEPS):
        env = {{"env_vars": {{"RWF_TASK_VAR": f"t{{i}}"}}}}
        node = step.options(runtime_env=env).bind(node, i, runs, go)
    return node
"""


def _code(directory: Path, version: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "shipped.py").write_text(f"VERSION = {version!r}\n")
    return directory


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_resumed_workflow_runs_with_its_recorded_env_on_a_new_cluster(tmp_path: Path) -> None:
    # Two workflows, each on a storage of its own (so a manager of its own): resumed
    # with the recorded environment (the default), and with the cluster's ("current").
    cases = {mode: (tmp_path / mode / "storage", tmp_path / mode / "runs") for mode in MODES}
    for _, runs in cases.values():
        runs.mkdir(parents=True)
    go, wid = tmp_path / "go", "runtime-env"
    first_code = _code(tmp_path / "code-v1", "v1")
    old, new = Cluster("old"), Cluster("new")
    try:
        old.start_head(num_cpus=2)
        start = write_script(
            tmp_path,
            "start",
            TASKS,
            f"""
            ray.init(address=ADDRESS, log_to_driver=False, runtime_env={{
                "working_dir": {str(first_code)!r}, "env_vars": {{"RWF_JOB_VAR": "job"}}}})
            for storage, runs in {[(str(s), str(r)) for s, r in cases.values()]!r}:
                workflow.init(storage=storage)
                workflow.run_async(chain(runs, {str(go)!r}), workflow_id={wid!r})
                wait_started(runs, f"seen{{GATE}}")
            emit(started=True)
            """,
        )
        # Run by the manager, so that its task in flight is cut off with the cluster.
        assert old.run(start, env={"RAY_WORKFLOWS_HOST": "0"}) == {"started": True}
        old.kill()
        shutil.rmtree(first_code)  # the new cluster never sees the directory
        go.touch()

        # The new cluster's job has code of its own: a later version of the module.
        new.start_head(num_cpus=2)
        later_code = _code(tmp_path / "code-v2", "v2")
        resume = write_script(
            tmp_path,
            "resume",
            f"""
            ray.init(address=ADDRESS, log_to_driver=False, runtime_env={{
                "working_dir": {str(later_code)!r}}})
            results = {{}}
            for mode, storage in {[(m, str(s)) for m, (s, _) in cases.items()]!r}:
                # Its manager resumes it (once the dead cluster's lease has expired).
                workflow.init(storage=storage, runtime_env=mode)
                deadline = time.monotonic() + 240
                while workflow.get_status({wid!r}).value not in ("SUCCESSFUL", "FAILED"):
                    assert time.monotonic() < deadline, "not done after 240 s"
                    time.sleep(0.2)
                meta = workflow.get_metadata({wid!r})
                output = workflow.get_output({wid!r}) if meta["status"] == "SUCCESSFUL" else None
                results[mode] = dict(status=meta["status"], error=meta.get("error"),
                                     env=meta.get("runtime_env"), output=output)
            emit(**results)
            """,
        )
        result = new.run(resume, timeout=420)
    finally:
        old.shutdown()
        new.shutdown()
    for mode, (storage, runs) in cases.items():
        assert result[mode]["status"] == "SUCCESSFUL", result
        assert result[mode]["output"] == STEPS, result
        seen = {i: runs_of(runs, f"seen{i}") for i in range(STEPS)}
        # Step 0 ran once, on the first cluster; step 1 there and again on the new one.
        assert [len(seen[i]) for i in range(STEPS)] == [1, 2, 1], seen
        first = [(0, seen[0][0]), (1, min(seen[1], key=lambda r: r["time"]))]
        again = [(1, max(seen[1], key=lambda r: r["time"])), (2, seen[2][0])]
        for i, found in first:  # on the first cluster
            assert (found["module"], found["job"], found["task"]) == ("v1", "job", f"t{i}")
        for i, found in again:  # resumed on the new cluster
            if mode == "recorded":  # the recorded module and variables, not the new job's
                assert (found["module"], found["job"], found["task"]) == ("v1", "job", f"t{i}")
            else:  # the new job's module; only the task's own option applies
                assert (found["module"], found["job"], found["task"]) == ("v2", None, f"t{i}")
        env = result[mode]["env"]  # recorded either way
        (uri, digest), *more = env["packages"].items()
        assert not more and uri.startswith("gcs://_ray_pkg_"), result
        assert env["job"] == {"working_dir": uri, "env_vars": {"RWF_JOB_VAR": "job"}}
        archive = (storage / "packages" / f"{digest}.zip").read_bytes()
        assert hashlib.sha256(archive).hexdigest() == digest
