"""Every TOML example in docs/rules.md loads (the docs cannot drift from the code)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.triggers import load_rules

DOC = Path(__file__).resolve().parents[2] / "docs" / "rules.md"
BLOCKS = re.findall(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
HEADER = '[[rule]]\nname = "doc"\npipeline = "p"\n'


def snippets() -> list[str]:
    """Whole rules, ``[rule.match]`` fragments, and one-line patterns (one rule each)."""
    out = []
    for block in BLOCKS:
        if block.lstrip().startswith("[[rule]]"):
            out.append(block)
        elif "[rule.match]" in block:
            out.append(HEADER + block)
        else:
            lines = [line for line in block.splitlines() if line.strip()]
            out.extend(f"{HEADER}[rule.match]\n{line}\n" for line in lines)
    return out


def test_the_doc_has_examples() -> None:
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("text", snippets())
def test_doc_example_loads(tmp_path: Path, text: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    assert len(load_rules([path])) == 1
