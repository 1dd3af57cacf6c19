"""Resolve a TorchRL-style attribute path (``"env.transform[0].loc"``, ``"policy['key']"``) on an
object, without ``eval``: only names, attributes and constant subscripts are allowed.

    >>> class A: x = {"k": [1, 2]}
    >>> resolve(A(), "x['k'][1]")
    2
"""
from __future__ import annotations

import ast
from typing import Any


def resolve(root: Any, path: str) -> Any:
    """``root.<path>``; ``AttributeError``/``KeyError``/``IndexError`` as plain Python raises
    them, ``ValueError`` for a path that is not names, attributes and constant subscripts."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"an attribute path is a non-empty string like 'env.batch_size'; got {path!r}.")
    try:
        node = ast.parse(path.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"{path!r} is not an attribute path like \"env.transform[0]\".") from None
    return _walk(root, node, path)


def _walk(root: Any, node: ast.AST, path: str) -> Any:
    if isinstance(node, ast.Name):
        return getattr(root, node.id)
    if isinstance(node, ast.Attribute):
        return getattr(_walk(root, node.value, path), node.attr)
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return _walk(root, node.value, path)[node.slice.value]
    raise ValueError(f"{path!r} is not an attribute path: only names, attributes and constant "
                     f"subscripts (like \"env.transform[0]\" or \"a['key']\") are allowed.")
