"""Quickstart: a durable workflow on the embedded default (a local Ray, a local directory).

Run it twice: the second run finds the workflow in storage and returns its stored
output without running any task again.
"""

from __future__ import annotations

import ray

import ray_workflows as workflow


@ray.remote
def fetch(order_id: int) -> dict[str, int]:
    print(f"  fetching order {order_id} (a task that runs only once per workflow)")
    return {"order": order_id, "amount": 40 + order_id}


@ray.remote
def total(*orders: dict[str, int]) -> int:
    return sum(o["amount"] for o in orders)


@ray.remote
def fib(n: int) -> int:
    if n <= 1:
        return n
    return workflow.continuation(add.bind(fib.bind(n - 1), fib.bind(n - 2)))


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


def main() -> None:
    dag = total.bind(*[fetch.bind(i) for i in range(3)])
    print("running workflow 'quickstart-orders'")
    result = workflow.run(dag, workflow_id="quickstart-orders", metadata={"source": "quickstart"})
    print(f"total = {result}")
    print(f"status = {workflow.get_status('quickstart-orders').value}")
    print(f"fib(10) by continuations = {workflow.run(fib.bind(10))}")
    print("workflows in storage:", len(workflow.list_all()))
    print("run me again: the stored workflow is resumed, and no 'fetching' line appears")


if __name__ == "__main__":
    main()
