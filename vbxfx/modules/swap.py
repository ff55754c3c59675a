"""Module swaps that keep what the swapped module carried: hooks, training mode, attributes.

>>> import torch
>>> root = torch.nn.Sequential(torch.nn.Sequential(torch.nn.ReLU()))
>>> old = root.get_submodule("0.0")
>>> replace_module([root], "0.0", old, torch.nn.Identity())
1
>>> type(root[0][0]).__name__
'Identity'
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from torch import nn

from vbxfx.errors import ConfigError

__all__ = ["copy_module_state", "replace_module", "split_name"]

# nn.Module's own hook registries (torch 2.x); each is an OrderedDict keyed by handle id.
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def copy_module_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` the hooks, training flag and extra plain attributes of ``src``.

    Hooks are copied, not moved: a handle returned by ``src.register_forward_hook`` removes
    the hook from ``src`` only. Plain attributes that ``dst`` does not have already (a flag
    some training code set on the layer) are copied by reference; vbxfx's own ``_vbx_*``
    attributes are not.
    """
    for name in _HOOK_DICTS:
        hooks = getattr(src, name, None)
        if isinstance(hooks, dict) and hooks:
            setattr(dst, name, collections.OrderedDict(hooks))
    if getattr(src, "_is_full_backward_hook", None) is not None:
        dst._is_full_backward_hook = src._is_full_backward_hook
    mine = vars(dst)
    for key, value in vars(src).items():
        if key not in mine and not key.startswith("_vbx_") and key not in _HOOK_DICTS:
            mine[key] = value
    dst.train(src.training)
    return dst


def split_name(fqn: str) -> tuple[str, str]:
    """``"layer1.0.conv1"`` -> ``("layer1.0", "conv1")``."""
    parent, _, leaf = fqn.rpartition(".")
    return parent, leaf


def replace_module(containers: Iterable[nn.Module], fqn: str, old: nn.Module,
                   new: nn.Module) -> int:
    """Set ``new`` at ``fqn`` in every container where ``old`` sits there; return how many.

    A GraphModule from ``torch.fx.symbolic_trace`` has its own parent modules but shares the
    layers with the traced root, so a swap has to happen in both; a container whose path
    does not exist, or holds something else there, is skipped.

    Raises:
        ConfigError: ``fqn`` is empty (the root itself cannot be swapped in place).
    """
    if not fqn:
        raise ConfigError("the model itself is a Conv2d/Linear layer and cannot be swapped in "
                          "place; wrap it, e.g. torch.nn.Sequential(model)")
    parent_name, leaf = split_name(fqn)
    done, seen = 0, set()
    for container in containers:
        try:
            parent = container.get_submodule(parent_name) if parent_name else container
        except AttributeError:
            continue
        if id(parent) in seen or parent._modules.get(leaf) is not old:
            continue
        seen.add(id(parent))
        setattr(parent, leaf, new)
        done += 1
    return done
