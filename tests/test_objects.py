"""Ray objects in workflows: how upstream outputs and ObjectRefs reach tasks, how
ObjectRef outputs come back, and how their values are checkpointed.

Semantics under test (see ``ray_workflows._core.plan``):

* an upstream node passed directly as an argument arrives as its value; nested in
  a list or dict it arrives as a ``ray.ObjectRef`` -- on a fresh run and after
  recovery alike;
* a top-level ``ObjectRef`` argument arrives as its value; nested ones stay refs;
* a task returning an ``ObjectRef`` has the value behind it as output (followed
  once); refs nested in an output come back as refs, from the checkpoint too;
* checkpointed ObjectRef values live once per workflow under
  ``workflows/<wid>/objects/<sha256>``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import ray
from helpers import count_runs, record_run

import ray_workflows as workflow

BIG = 5 * 1024 * 1024  # 5 MB


# --------------------------------------------------------------------------- tasks
@ray.remote
def value(x: Any) -> Any:
    return x


def shapes(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """What each argument looks like inside the task, and the values behind refs."""

    def shape(v: Any) -> Any:
        if isinstance(v, ray.ObjectRef):
            return ("ref", ray.get(v))
        if isinstance(v, list):
            return [shape(x) for x in v]
        if isinstance(v, tuple):
            return tuple(shape(x) for x in v)
        if isinstance(v, dict):
            return {k: shape(x) for k, x in v.items()}
        return ("value", v)

    return {"args": [shape(a) for a in args], "kwargs": {k: shape(v) for k, v in kwargs.items()}}


describe = ray.remote(shapes)


@ray.remote
def describe_or_fail(flag: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Like ``describe``, but fails until the file ``flag`` exists (to force a resume).
    It looks at its own arguments: handing them to ``describe.remote`` would let Ray
    resolve a top-level ref once more (a ref of a ref would arrive as the value)."""
    if not os.path.exists(flag):
        raise RuntimeError("not yet")
    return shapes(*args, **kwargs)


@ray.remote
def counted_value(directory: str, name: str, x: Any) -> Any:
    record_run(directory, name)
    return x


@ray.remote
def put_value(x: Any) -> ray.ObjectRef:
    return ray.put(x)


@ray.remote
def wrap_ref(x: Any) -> ray.ObjectRef:
    """A task whose Ray output is itself an ObjectRef (of ``x``)."""
    return ray.put(x)


@ray.remote
def ref_of_ref(x: Any) -> ray.ObjectRef:
    """Returns a ref whose value is another ref (whose value is ``x``)."""
    return wrap_ref.remote(x)


@ray.remote
def list_of_refs(xs: list[Any]) -> list[ray.ObjectRef]:
    return [ray.put(x) for x in xs]


@ray.remote
def dict_of_refs(xs: dict[str, Any]) -> dict[str, ray.ObjectRef]:
    return {k: ray.put(x) for k, x in xs.items()}


@ray.remote
def sum_refs(*refs: ray.ObjectRef) -> int:
    assert all(isinstance(r, ray.ObjectRef) for r in refs), refs
    return sum(ray.get(list(refs)))


@ray.remote
def sum_nested(refs: list[ray.ObjectRef]) -> int:
    assert all(isinstance(r, ray.ObjectRef) for r in refs), refs
    return sum(ray.get(refs))


@ray.remote
def repeat_ref(ref_list: list[ray.ObjectRef], n: int) -> list[ray.ObjectRef]:
    """Returns the same ref ``n`` times in a list."""
    return ref_list * n


@ray.remote
def make_big(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + b"x" * (n % 256)


@ray.remote
def digest(data: Any) -> tuple[int, str]:
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    return len(data), hashlib.sha256(data).hexdigest()


@ray.remote
def digest_nested(box: dict[str, Any]) -> tuple[int, str]:
    data = ray.get(box["data"])
    return len(data), hashlib.sha256(data).hexdigest()


def objects_dir(storage: str, wid: str) -> Path:
    return Path(storage, "workflows", wid, "objects")


def object_files(storage: str, wid: str) -> list[Path]:
    d = objects_dir(storage, wid)
    if not d.exists():
        return []
    return sorted(p for p in d.iterdir() if not p.name.startswith(".rwf-"))


BIG_DIGEST = hashlib.sha256(bytes(range(256)) * (BIG // 256)).hexdigest()


# ------------------------------------------------------------- upstream arguments
def test_direct_upstream_arrives_as_value_nested_as_ref(storage: str, wid: str) -> None:
    a, b = value.bind(1), value.bind(2)
    dag = describe.bind(a, [b], {"k": a}, kw=b, kw_list=[a, b])
    out = workflow.run(dag, workflow_id=wid)
    assert out == {
        "args": [("value", 1), [("ref", 2)], {"k": ("ref", 1)}],
        "kwargs": {"kw": ("value", 2), "kw_list": [("ref", 1), ("ref", 2)]},
    }
    assert workflow.get_output(wid) == out


def test_same_upstream_both_direct_and_nested(storage: str, wid: str) -> None:
    a = value.bind(7)
    out = workflow.run(describe.bind(a, [a], t=(a,)), workflow_id=wid)
    assert out == {"args": [("value", 7), [("ref", 7)]], "kwargs": {"t": (("ref", 7),)}}


def test_upstream_semantics_survive_recovery(
    storage: str, wid: str, tmp_path: Path, counter_dir: Path
) -> None:
    """After a resume, the finished upstream outputs come from their checkpoints, and
    still arrive as values when direct and as ObjectRefs when nested."""
    flag = str(tmp_path / "go")
    a = counted_value.bind(str(counter_dir), "a", 10)
    b = counted_value.bind(str(counter_dir), "b", "bee")
    dag = describe_or_fail.options(**workflow.options(max_retries=0)).bind(
        flag, a, [b], {"k": a}, kw=b
    )
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(dag, workflow_id=wid)
    assert workflow.get_status(wid) == workflow.FAILED
    Path(flag).touch()
    expected = {
        "args": [("value", 10), [("ref", "bee")], {"k": ("ref", 10)}],
        "kwargs": {"kw": ("value", "bee")},
    }
    assert workflow.resume(wid) == expected
    # the upstream tasks were not re-run: their outputs came from storage
    assert count_runs(counter_dir, "a") == 1
    assert count_runs(counter_dir, "b") == 1
    assert workflow.get_output(wid) == expected


# ------------------------------------------------------------- ObjectRef arguments
def test_top_level_ref_arrives_as_value_nested_stays_ref(storage: str, wid: str) -> None:
    r1, r2 = ray.put("one"), ray.put(2.5)
    out = workflow.run(describe.bind(r1, [r2], {"r": r1}, kw=r2, kw_list=[r1]), workflow_id=wid)
    assert out == {
        "args": [("value", "one"), [("ref", 2.5)], {"r": ("ref", "one")}],
        "kwargs": {"kw": ("value", 2.5), "kw_list": [("ref", "one")]},
    }


def test_ref_arguments_survive_recovery(storage: str, wid: str, tmp_path: Path) -> None:
    flag = str(tmp_path / "go")
    r1, r2 = ray.put(11), ray.put("twelve")
    dag = describe_or_fail.options(**workflow.options(max_retries=0)).bind(
        flag, r1, [r2], kw={"r": r1}
    )
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(dag, workflow_id=wid)
    Path(flag).touch()
    del r1, r2  # the resumed run needs only the checkpointed values
    assert workflow.resume(wid) == {
        "args": [("value", 11), [("ref", "twelve")]],
        "kwargs": {"kw": {"r": ("ref", 11)}},
    }


# --------------------------------------------------------------- ObjectRef outputs
def test_ref_output_is_followed_once(storage: str, wid: str) -> None:
    assert workflow.run(put_value.bind({"a": [1, 2]}), workflow_id=wid) == {"a": [1, 2]}
    assert workflow.get_output(wid) == {"a": [1, 2]}
    assert ray.get(workflow.get_output_async(wid)) == {"a": [1, 2]}


def test_ref_output_reaches_a_consumer_as_its_value(storage: str, wid: str) -> None:
    out = workflow.run(describe.bind(put_value.bind(5), [put_value.bind(6)]), workflow_id=wid)
    assert out == {"args": [("value", 5), [("ref", 6)]], "kwargs": {}}


def test_ref_to_a_ref_output_is_followed_only_once(storage: str, wid: str) -> None:
    out = workflow.run(ref_of_ref.bind("deep"), workflow_id=wid)
    assert isinstance(out, ray.ObjectRef)
    assert ray.get(out) == "deep"
    again = workflow.get_output(wid)
    assert isinstance(again, ray.ObjectRef)
    assert ray.get(again) == "deep"


def test_nested_refs_in_output_stay_refs_also_from_checkpoint(storage: str, wid: str) -> None:
    out = workflow.run(list_of_refs.bind([1, "two", [3]]), workflow_id=wid)
    assert isinstance(out, list) and len(out) == 3
    assert all(isinstance(r, ray.ObjectRef) for r in out)
    assert ray.get(out) == [1, "two", [3]]
    del out
    loaded = workflow.get_output(wid)
    assert isinstance(loaded, list) and all(isinstance(r, ray.ObjectRef) for r in loaded)
    assert ray.get(loaded) == [1, "two", [3]]
    task_out = workflow.get_output(wid, task_id="test_objects.list_of_refs")
    assert all(isinstance(r, ray.ObjectRef) for r in task_out)
    assert ray.get(task_out) == [1, "two", [3]]


def test_dict_of_refs_output_from_checkpoint(storage: str, wid: str) -> None:
    out = workflow.run(dict_of_refs.bind({"x": 1, "y": b"y"}), workflow_id=wid)
    assert set(out) == {"x", "y"} and all(isinstance(r, ray.ObjectRef) for r in out.values())
    loaded = workflow.get_output(wid)
    assert {k: ray.get(r) for k, r in loaded.items()} == {"x": 1, "y": b"y"}


def test_nested_refs_output_flow_to_downstream(storage: str, wid: str) -> None:
    """The seed pattern: a list of refs returned by one task, passed directly to the next
    (a direct upstream: the list arrives as its value, a list of ObjectRefs)."""
    assert workflow.run(sum_nested.bind(list_of_refs.bind([1, 2, 3, 4])), workflow_id=wid) == 10


# --------------------------------------------------------------------- dedup on disk
def test_one_ref_used_21_times_is_stored_once(storage: str, wid: str) -> None:
    payload = "z" * 10_000
    ref = ray.put(payload)
    # 20 tasks get it directly (as a value), one nested in a list
    tasks = [describe.bind(ref) for _ in range(20)] + [describe.bind([ref])]
    outs = workflow.run(collect.bind(*tasks), workflow_id=wid)
    assert len(outs) == 21
    assert all(o == {"args": [("value", payload)], "kwargs": {}} for o in outs[:20])
    assert outs[20] == {"args": [[("ref", payload)]], "kwargs": {}}
    files = object_files(storage, wid)
    assert len(files) == 1, files
    # content addressed: the name is the sha256 of the stored record
    (f,) = files
    assert len(f.name) == 64 and all(c in "0123456789abcdef" for c in f.name)
    assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name


def test_no_refs_no_objects(storage: str, wid: str) -> None:
    assert workflow.run(describe.bind(value.bind(1), [value.bind(2)]), workflow_id=wid) == {
        "args": [("value", 1), [("ref", 2)]],
        "kwargs": {},
    }
    assert Path(storage, "workflows", wid).is_dir()
    assert object_files(storage, wid) == []


@ray.remote
def collect(*xs: Any) -> list[Any]:
    return list(xs)


def test_one_ref_repeated_21_times_in_an_output_is_stored_once(storage: str, wid: str) -> None:
    out = workflow.run(repeat_ref.bind([ray.put("same" * 1000)], 21), workflow_id=wid)
    assert len(out) == 21 and all(isinstance(r, ray.ObjectRef) for r in out)
    loaded = workflow.get_output(wid)
    assert len(loaded) == 21 and ray.get(loaded) == ["same" * 1000] * 21
    # one object file: the argument's value and the 21 output refs share it
    assert len(object_files(storage, wid)) == 1


def test_objects_are_stored_per_workflow(storage: str, wid: str) -> None:
    ref = ray.put("shared-between-workflows")
    for suffix in ("-1", "-2"):
        assert workflow.run(describe.bind([ref]), workflow_id=wid + suffix) == {
            "args": [[("ref", "shared-between-workflows")]],
            "kwargs": {},
        }
    one, two = object_files(storage, wid + "-1"), object_files(storage, wid + "-2")
    assert len(one) == 1 and len(two) == 1
    assert one[0].name == two[0].name  # same content, same address, one copy each


# ----------------------------------------------------------------------- big data
def test_5mb_bytes_between_tasks(storage: str, wid: str) -> None:
    big = make_big.bind(BIG)
    out = workflow.run(collect.bind(digest.bind(big), digest.bind(big)), workflow_id=wid)
    assert out == [(BIG, BIG_DIGEST), (BIG, BIG_DIGEST)]
    # the producer's checkpoint, read back from storage, is the same 5 MB
    loaded = workflow.get_output(wid, task_id="test_objects.make_big")
    assert isinstance(loaded, bytes) and len(loaded) == BIG
    assert hashlib.sha256(loaded).hexdigest() == BIG_DIGEST


def test_5mb_output_same_from_memory_and_checkpoint(storage: str, wid: str) -> None:
    from_memory = workflow.run(make_big.bind(BIG), workflow_id=wid)
    from_checkpoint = workflow.get_output(wid)
    assert len(from_memory) == BIG
    assert from_memory == from_checkpoint
    assert ray.get(workflow.get_output_async(wid)) == from_memory


def test_5mb_object_ref_argument_nested_and_checkpointed(storage: str, wid: str) -> None:
    data = bytes(range(256)) * (BIG // 256)
    ref = ray.put(data)
    out = workflow.run(
        collect.bind(digest.bind(ref), digest_nested.bind({"data": ref})), workflow_id=wid
    )
    assert out == [(BIG, BIG_DIGEST), (BIG, BIG_DIGEST)]
    files = object_files(storage, wid)
    assert len(files) == 1 and files[0].stat().st_size > BIG


def test_5mb_ref_output_from_memory_and_checkpoint(storage: str, wid: str) -> None:
    out = workflow.run(list_of_refs.bind([b"a" * BIG]), workflow_id=wid)
    assert ray.get(out[0]) == b"a" * BIG
    loaded = workflow.get_output(wid)
    assert isinstance(loaded[0], ray.ObjectRef) and ray.get(loaded[0]) == b"a" * BIG


@ray.remote
def nested_ref_of_ref(x: Any) -> list[ray.ObjectRef]:
    """A list holding one ref whose value is itself a ref (of ``x``)."""
    return [wrap_ref.remote(x)]


def test_nested_ref_of_ref_output_same_from_memory_and_checkpoint(storage: str, wid: str) -> None:
    out = workflow.run(nested_ref_of_ref.bind("deep"), workflow_id=wid)
    inner = ray.get(out[0])
    assert isinstance(inner, ray.ObjectRef) and ray.get(inner) == "deep"
    loaded = workflow.get_output(wid)
    inner_loaded = ray.get(loaded[0])
    assert isinstance(inner_loaded, ray.ObjectRef) and ray.get(inner_loaded) == "deep"


@ray.remote
def is_ref(x: Any) -> Any:
    return (isinstance(x, ray.ObjectRef), ray.get(x) if isinstance(x, ray.ObjectRef) else x)


def test_top_level_ref_of_ref_argument_fresh_run(storage: str, wid: str) -> None:
    outer = wrap_ref.remote("deep")  # its value is an ObjectRef
    # plain Ray: a top-level ref argument arrives as its value, here a ref
    assert ray.get(is_ref.remote(outer)) == (True, "deep")
    assert workflow.run(is_ref.bind(outer), workflow_id=wid) == (True, "deep")


def test_top_level_ref_of_ref_argument_same_after_recovery(
    storage: str, wid: str, tmp_path: Path
) -> None:
    flag = str(tmp_path / "go")
    outer = wrap_ref.remote("deep")  # its value is an ObjectRef
    dag = describe_or_fail.options(**workflow.options(max_retries=0)).bind(flag, outer)
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(dag, workflow_id=wid)
    Path(flag).touch()
    assert workflow.resume(wid) == {"args": [("ref", "deep")], "kwargs": {}}


@ray.remote
def pass_along(ref_box: list[ray.ObjectRef], n: int) -> Any:
    if n == 0:
        return ray.get(ref_box[0])
    return workflow.continuation(pass_along.bind(ref_box, n - 1))


def test_one_ref_passed_through_21_continuations_is_stored_once(storage: str, wid: str) -> None:
    ref = ray.put("carried" * 1000)
    assert workflow.run(pass_along.bind([ref], 20), workflow_id=wid) == "carried" * 1000
    assert len(object_files(storage, wid)) == 1


# ------------------------------------------------- refs in continuations / recovery
@ray.remote
def continue_with_refs(flag: str) -> Any:
    return workflow.continuation(
        describe_or_fail.options(**workflow.options(max_retries=0)).bind(
            flag, ray.put("top"), [ray.put("nested")], kw=ray.put("kw")
        )
    )


def test_refs_bound_in_a_continuation_fresh_and_after_recovery(
    storage: str, wid: str, tmp_path: Path
) -> None:
    expected = {"args": [("value", "top"), [("ref", "nested")]], "kwargs": {"kw": ("value", "kw")}}
    flag = str(tmp_path / "go")
    Path(flag).touch()
    assert workflow.run(continue_with_refs.bind(flag), workflow_id=wid) == expected
    # the same, failing once inside the continuation, then resumed from its checkpoint
    flag2 = str(tmp_path / "go2")
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(continue_with_refs.bind(flag2), workflow_id=wid + "-r")
    Path(flag2).touch()
    assert workflow.resume(wid + "-r") == expected
    assert len(object_files(storage, wid + "-r")) == 3


@ray.remote
def fib(n: int) -> int:
    if n <= 1:
        return n
    return workflow.continuation(add_values.bind(fib.bind(n - 1), fib.bind(n - 2)))


@ray.remote
def add_values(a: int, b: int) -> int:
    return a + b


def test_continuation_output_nested_is_a_ref_direct_is_a_value(storage: str, wid: str) -> None:
    assert workflow.run(describe.bind(fib.bind(6), [fib.bind(5)]), workflow_id=wid) == {
        "args": [("value", 8), [("ref", 5)]],
        "kwargs": {},
    }


def test_list_of_refs_upstream_after_recovery(
    storage: str, wid: str, tmp_path: Path, counter_dir: Path
) -> None:
    flag = str(tmp_path / "go")
    refs = list_of_refs.bind(counted_value.bind(str(counter_dir), "x", [3, 4]))
    dag = describe_or_fail.options(**workflow.options(max_retries=0)).bind(flag, refs, [refs])
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(dag, workflow_id=wid)
    Path(flag).touch()
    # direct: the list of refs itself; nested: a ref to that list
    out = workflow.resume(wid)
    direct, (nested,) = out["args"]
    assert direct == [("ref", 3), ("ref", 4)]
    kind, inner = nested
    assert kind == "ref" and len(inner) == 2
    assert all(isinstance(r, ray.ObjectRef) for r in inner) and ray.get(inner) == [3, 4]
    assert count_runs(counter_dir, "x") == 1


class Label(str):
    """A str subclass: it must keep its class through a checkpoint."""


def test_values_keep_their_exact_types_through_the_record_pickling() -> None:
    """Flat values take the C pickler, the rest cloudpickle with refs lifted out; both
    must give back what went in, type for type (bool is not int, tuple not list)."""
    from ray_workflows._core import serialization

    ref = ray.put(41)
    cases: list[Any] = [
        True,
        7,
        2**80,
        1.5,
        "s",
        b"b",
        None,
        [True, 1],
        (1, "a"),
        {"a": 1, 2: None},
        {},
        (),
        list(range(100)),  # too long for the flat path
        [[1]],
        {"k": [1]},
        Label("x"),
        [Label("y")],
        {"r": ref},
        [ref, ref],
    ]
    for value in cases:
        data, refs = serialization.dumps(value)
        back = serialization.loads(data, refs)
        assert back == value and type(back) is type(value), value
        if isinstance(value, (list, tuple)) and value:
            assert [type(v) for v in back] == [type(v) for v in value]
    data, refs = serialization.dumps([ref, ref])
    assert refs == [ref]  # one ref, lifted out once
    assert ray.get(serialization.loads(data, refs)[1]) == 41
