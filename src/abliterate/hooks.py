"""The one way hooks go onto a model: attached for a ``with`` block, all or none, always removed.

Activation capture (:mod:`abliterate.activations`) and hook-mode ablation
(:mod:`abliterate.ablation`) both attach their hooks through :func:`attached`, so a failure while
registering, or an error inside the block, never leaves a hook behind on a model that later
trials reuse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

HookKind = Literal["forward", "forward_pre"]


@dataclass(frozen=True)
class Hook:
    """One hook: ``function`` runs around ``module``'s forward.

    ``forward``: ``function(module, args, output)``, its return value (if not None) replaces the
    output. ``forward_pre``: ``function(module, args)``, its return value (if not None) replaces
    the positional arguments. As ``nn.Module.register_forward_hook`` and
    ``register_forward_pre_hook``.
    """

    module: nn.Module
    kind: HookKind
    function: Callable[..., Any]


@contextmanager
def attached(hooks: Iterable[Hook]) -> Iterator[None]:
    """Register ``hooks`` in order for the duration of a ``with`` block.

    All or none: if registering one fails, those already registered are removed before the error
    propagates. On exit, normal or by an error, every hook is removed.

    Raises:
        ValueError: a hook's kind is neither ``forward`` nor ``forward_pre`` (nothing is left
            registered).
    """
    with ExitStack() as stack:
        for hook in hooks:
            if hook.kind == "forward":
                handle = hook.module.register_forward_hook(hook.function)
            elif hook.kind == "forward_pre":
                handle = hook.module.register_forward_pre_hook(hook.function)
            else:
                raise ValueError(f"unknown hook kind {hook.kind!r}: forward or forward_pre")
            stack.callback(handle.remove)
        yield
