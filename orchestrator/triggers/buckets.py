"""What an index bucket decides: exact ``data.dataset`` values (and prefixes), ``type``
values, and a pattern tree less the clause its bucket already decided."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.triggers.nodes import Clause, Nested, Node, Or

__all__ = ["dataset_keys", "exact_datasets", "exact_strings", "without", "without_dataset"]


def without(node: Node, key: str) -> Node:
    """``node`` less its clause on ``key`` (which a bucket has already decided)."""
    return Node([c for c in node.clauses if isinstance(c, Or) or c.key != key])


def without_dataset(root: Node) -> Node:
    """``root`` less its ``data.dataset`` clause."""
    clauses: list[Clause] = []
    for clause in root.clauses:
        if isinstance(clause, Nested) and clause.key == "data":
            rest = without(clause.sub, "dataset")
            if rest.clauses:
                clauses.append(Nested(clause.key, clause.path, rest))
        else:
            clauses.append(clause)
    return Node(clauses)


def exact_strings(items: Any) -> list[str]:
    """The values of a leaf that lists only exact strings (else none)."""
    items = items if isinstance(items, list | tuple) else [items]
    if items and all(isinstance(x, str) for x in items):
        return list(dict.fromkeys(items))
    return []


def dataset_keys(items: Any) -> tuple[list[str], list[str]] | None:
    """(exact values, prefixes) of a ``data.dataset`` leaf made only of those; else None."""
    items = items if isinstance(items, list | tuple) else [items]
    exact: list[str] = []
    prefixes: list[str] = []
    for item in items:
        if isinstance(item, str):
            exact.append(item)
        elif isinstance(item, Mapping) and len(item) == 1 and isinstance(item.get("prefix"), str):
            prefixes.append(item["prefix"])
        else:
            return None
    if not items:
        return None
    return list(dict.fromkeys(exact)), list(dict.fromkeys(prefixes))


def exact_datasets(pattern: Mapping[str, Any]) -> list[str] | None:
    """The datasets ``pattern`` allows when it names exact ones only (no prefix); else None."""
    data = pattern.get("data")
    keys = dataset_keys(data.get("dataset")) if isinstance(data, Mapping) else None
    if keys is None or keys[1]:
        return None
    return keys[0]
