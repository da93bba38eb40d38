"""Dotted module paths ("model.layers.3.mlp"), as mlx's parameter trees name modules."""

from __future__ import annotations

import mlx.nn as nn


def module_at(root: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` below ``root`` ("" is ``root`` itself); list entries are numbers."""
    module = root
    for part in path.split(".") if path else []:
        module = module[int(part)] if part.isdigit() else module[part]
    return module


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` below ``root``."""
    parent_path, _, name = path.rpartition(".")
    parent = module_at(root, parent_path)
    if name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def child_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The direct submodules of ``module`` with their names."""
    return [(k, v) for k, v in module.children().items() if isinstance(v, nn.Module)]
