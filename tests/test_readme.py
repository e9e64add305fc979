"""Every Python snippet of README.md runs as written (a newcomer's first contact).

Each ```python block is executed on its own, in a fresh namespace, in the README's order. A
block that needs a GPU says so in a comment line ``# needs a GPU`` and is skipped without one.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"),
                    flags=re.MULTILINE | re.DOTALL)


def test_the_readme_has_python_snippets():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"snippet{i}" for i in range(len(BLOCKS))])
def test_readme_snippet_runs_as_written(code, monkeypatch):
    if "# needs a GPU" in code and not torch.cuda.is_available():
        pytest.skip("the snippet needs a GPU")
    # Dynamo's caches from other test modules must not count towards its recompile limit.
    torch._dynamo.reset()
    namespace = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)   # noqa: S102 - the README's own code
    torch._dynamo.reset()
    # A snippet that says its edit runs sparsely must plan some level sparse (a mask whose
    # grown tiles pass the dense threshold made the backend's example a dense regeneration).
    if "sparsely" in code:
        plan = namespace["ed"].plan
        assert not all(level.dense for level in plan.levels), plan
