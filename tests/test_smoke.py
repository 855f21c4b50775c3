import ray

import ray_workflows as workflow


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


def test_run_returns_the_output(storage: str, wid: str) -> None:
    assert workflow.run(add.bind(1, add.bind(2, 3)), workflow_id=wid) == 6
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
