"""Every ``python`` code block in docs/*.md and the README runs, top to bottom per file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(path: Path) -> list[str]:
    return _BLOCK.findall(path.read_text())


def test_docs_have_code() -> None:
    assert sum(len(blocks(p)) for p in DOCS) >= 10


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_doc_samples_run(path: Path, fresh_storage: str) -> None:
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, code in enumerate(blocks(path)):
        try:
            exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{path.name} block {i} failed: {exc!r}\n{code}") from exc
