"""The hook primitive: hooks attached for a block, all or none, removed on exit and on errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from abliterate.hooks import Hook, attached


def _hook_counts(module: nn.Module) -> tuple[int, int]:
    return len(module._forward_pre_hooks), len(module._forward_hooks)


def test_hooks_run_inside_the_block_and_are_gone_after_it():
    linear = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    plain = linear(x)

    def double_input(_module, args):
        return (args[0] * 2,)

    def negate_output(_module, _args, output):
        return -output

    hooks = [Hook(linear, "forward_pre", double_input), Hook(linear, "forward", negate_output)]
    with attached(hooks):
        assert _hook_counts(linear) == (1, 1)
        assert torch.allclose(linear(x), -linear.forward(2 * x))
    assert _hook_counts(linear) == (0, 0)
    assert torch.equal(linear(x), plain)


def test_an_error_in_the_block_removes_every_hook():
    modules = [nn.Linear(2, 2) for _ in range(3)]
    with (
        pytest.raises(RuntimeError, match="inside"),
        attached(Hook(module, "forward", lambda *_: None) for module in modules),
    ):
        assert all(_hook_counts(module) == (0, 1) for module in modules)
        raise RuntimeError("inside")
    assert all(_hook_counts(module) == (0, 0) for module in modules)


def test_a_failing_registration_leaves_no_hook_behind():
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    hooks = [
        Hook(first, "forward", lambda *_: None),
        Hook(first, "forward_pre", lambda *_: None),
        Hook(second, "backward", lambda *_: None),  # type: ignore[arg-type]
    ]
    with pytest.raises(ValueError, match="backward"), attached(hooks):
        pytest.fail("the block must not run")
    assert _hook_counts(first) == (0, 0)
    assert _hook_counts(second) == (0, 0)
