"""Virtual actor state beyond JSON, and the options of 1.x (seeds 002 and 004).

A ``__dict__`` state must be JSON; what ``__getstate__`` returns may be anything
picklable (seed 002's Example 12 keeps scikit-learn estimators in its actors).
``Cls.options(...)`` and ``method.options(max_retries=..., catch_exceptions=...)``
behave as Ray 1.x's did.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import ray
from conftest import kill_manager
from helpers import count_runs, record_run

import ray_workflows as workflow


def test_seed_002_example_12_machine_learning_workflow(storage: str) -> None:
    try:
        import numpy as np
        import pandas as pd
        from sklearn import base
        from sklearn.base import BaseEstimator
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
        from sklearn.tree import DecisionTreeClassifier
    except ImportError as exc:
        pytest.skip(f"Example 12 needs scikit-learn and pandas (the test extra): {exc}")

    # The seed's ray.init(address='auto') and workflow.init(): the session's Ray and
    # the test's storage stand in. `@ray.workflow.virtual_actor` is the import changed.
    @workflow.virtual_actor
    class estimator_virtual_actor:
        def __init__(self, estimator: BaseEstimator):
            if estimator is not None:
                self.estimator = estimator

        def fit(self, inputtuple):
            (X, y, mode) = inputtuple
            if base.is_classifier(self.estimator) or base.is_regressor(self.estimator):
                self.estimator.fit(X, y)
                return X, y, mode
            else:
                X = self.estimator.fit_transform(X)
                return X, y, mode

        @workflow.virtual_actor.readonly
        def predict(self, inputtuple):
            (X, y, mode) = inputtuple
            if base.is_classifier(self.estimator) or base.is_regressor(self.estimator):
                pred_y = self.estimator.predict(X)
                return X, pred_y, mode
            else:
                X = self.estimator.transform(X)
                return X, y, mode

        def run_workflow_step(self, inputtuple):
            (X, y, mode) = inputtuple
            if mode == "fit":
                return self.fit(inputtuple)
            elif mode == "predict":
                return self.predict(inputtuple)

        def __getstate__(self):
            return self.estimator

        def __setstate__(self, estimator):
            self.estimator = estimator

    ## prepare the data
    X = pd.DataFrame(np.random.randint(0, 100, size=(10000, 4)), columns=list("ABCD"))
    y = pd.DataFrame(np.random.randint(0, 2, size=(10000, 1)), columns=["Label"])

    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2)

    # The seed's actor ids, made unique for the session's storage.
    suffix = uuid.uuid4().hex[:6]

    @workflow.step
    def scaling(inputtuple, name):
        va = estimator_virtual_actor.get_or_create(name, StandardScaler())
        outputtuple = va.run_workflow_step.run_async(inputtuple)
        return outputtuple

    @workflow.step
    def classification(inputtuple, name):
        va = estimator_virtual_actor.get_or_create(name, DecisionTreeClassifier(max_depth=3))
        outputtuple = va.run_workflow_step.run_async(inputtuple)
        return outputtuple

    training_tuple = (X_train, y_train, "fit")
    classification.step(
        scaling.step(training_tuple, f"standardscalar-{suffix}"), f"decisiontree-{suffix}"
    ).run(f"training_pipeline-{suffix}")

    predict_tuple = (X_test, y_test, "predict")
    (X, pred_y, mode) = classification.step(
        scaling.step(predict_tuple, f"standardscalar-{suffix}"), f"decisiontree-{suffix}"
    ).run(f"prediction_pipeline-{suffix}")
    assert pred_y.shape[0] == 2000

    # Beyond the seed: the fitted estimators are the stored state, so another
    # prediction workflow predicts the same labels.
    (_, again, _) = classification.step(
        scaling.step(predict_tuple, f"standardscalar-{suffix}"), f"decisiontree-{suffix}"
    ).run(f"prediction_pipeline-2-{suffix}")
    assert (again == pred_y).all()


@workflow.virtual_actor
class Holder:
    """State that is not JSON: a set, a tuple key, and an ObjectRef."""

    def __init__(self) -> None:
        self.items: set[int] = set()
        self.ref = ray.put({"big": list(range(5))})

    def add(self, x: int) -> int:
        self.items.add(x)
        return len(self.items)

    @workflow.virtual_actor.readonly
    def view(self) -> tuple[list[int], dict[str, list[int]]]:
        return sorted(self.items), ray.get(self.ref)

    def __getstate__(self) -> dict[str, object]:
        return {"items": self.items, "ref": self.ref}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.items, self.ref = state["items"], state["ref"]  # type: ignore[assignment]


def test_a_picklable_getstate_survives_the_manager(fresh_storage: str, wid: str) -> None:
    actor = Holder.get_or_create(wid)
    assert actor.add.run(3) == 1
    assert actor.add.run(3) == 1
    assert actor.add.run(4) == 2
    kill_manager(fresh_storage)
    workflow.init(fresh_storage)
    assert workflow.get_actor(wid).view.run() == ([3, 4], {"big": [0, 1, 2, 3, 4]})


def test_a_dict_state_must_still_be_json(storage: str, wid: str) -> None:
    @workflow.virtual_actor
    class Loose:
        def __init__(self) -> None:
            self.items: set[int] = set()

    with pytest.raises(ValueError, match=r"must be JSON serializable.*__getstate__"):
        ray.get(Loose.get_or_create(wid).ready())


@workflow.virtual_actor
class Flaky:
    def __init__(self, runs: str) -> None:
        self.runs = runs
        self.n = 0

    def incr(self, fail_times: int) -> int:
        record_run(self.runs, "incr")
        self.n += 1
        if count_runs(self.runs, "incr") <= fail_times:
            raise RuntimeError("flaky")
        return self.n

    @workflow.virtual_actor.readonly
    def value(self) -> int:
        return self.n


def test_method_max_retries_and_catch_exceptions(storage: str, wid: str, tmp_path: Path) -> None:
    actor = Flaky.get_or_create(wid, str(tmp_path))
    # Two failures, two retries: the third run succeeds, on the state it started from.
    assert actor.incr.options(max_retries=2).run(2) == 1
    assert count_runs(str(tmp_path), "incr") == 3
    value, error = actor.incr.options(catch_exceptions=True).run(99)
    assert value is None and isinstance(error, RuntimeError)
    assert actor.value.run() == 1
    assert actor.incr.options(catch_exceptions=True).run(0) == (2, None)
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['retries'\].*max_retries"):
        actor.incr.options(retries=2)
    with pytest.raises(ValueError, match=r"max_retries .* must be an int"):
        actor.incr.options(max_retries="2")


def test_class_options_are_stored_with_the_actor(storage: str, wid: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['actor_id'\]"):
        Flaky.options(actor_id="x")
    actor = Flaky.options(max_retries=1, num_cpus=0.5).get_or_create(wid, str(tmp_path))
    ray.get(actor.ready())
    # The default comes from the class options, from any handle.
    assert workflow.get_actor(wid).incr.run(1) == 1
    assert count_runs(str(tmp_path), "incr") == 2
    with pytest.raises(RuntimeError, match="flaky"):
        actor.incr.options(max_retries=0).run(5)
