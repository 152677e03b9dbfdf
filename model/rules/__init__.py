"""Learning rules: ``vdib`` (the paper's rule) and ``vdib-bptt`` (surrogate-gradient BPTT).

Usage (training/)::

    rule = build_rule("vdib", naturalizer, lr=1e-3, beta=1e-3, baseline="loo", n_samples=2)
    stats = rule.train_step(x, target, generator=g)   # x [T, B, C, H, W] or [T, B, N]
    ckpt = rule.state_dict(); rule.load_state_dict(ckpt)   # model + optimizers + rule state
    rule.all_reduce = lambda t: (dist.all_reduce(t), t)[1]  # DDP: sum over ranks

By concern: :mod:`.base` (the :class:`Rule` API every rule shares), :mod:`.vdib` (the paper's
rule: score-function readout gradients, e-prop/DFA hidden gradients, the baselines),
:mod:`.bptt` (``vdib-bptt``), :mod:`.calibration` (hidden activity and the calibrated init).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..naturalizer import Naturalizer
from .base import Rule, TargetSteps
from .bptt import BPTTOptions, BPTTRule
from .calibration import calibrate_hidden_init, hidden_activity
from .vdib import BASELINES, VDIBOptions, VDIBRule, encoder_gradients, per_row_gradients

__all__ = [
    "BASELINES",
    "RULES",
    "BPTTOptions",
    "BPTTRule",
    "Rule",
    "TargetSteps",
    "VDIBOptions",
    "VDIBRule",
    "build_rule",
    "calibrate_hidden_init",
    "encoder_gradients",
    "hidden_activity",
    "per_row_gradients",
    "rule_options",
]

RULES: dict[str, type[Rule]] = {"vdib": VDIBRule, "vdib-bptt": BPTTRule}
_OPTIONS: dict[str, type[VDIBOptions] | type[BPTTOptions]] = {"vdib": VDIBOptions, "vdib-bptt": BPTTOptions}


def rule_options(name: str) -> list[str]:
    """Option names a rule accepts (for CLIs)."""
    return [f.name for f in fields(_OPTIONS[name])]


def build_rule(name: str, naturalizer: Naturalizer, **options: Any) -> Rule:
    """Build a learning rule by name (``vdib``, ``vdib-bptt``) for ``naturalizer`` (trained in place)."""
    cls = RULES.get(name)
    if cls is None:
        raise KeyError(f"unknown rule {name!r}; known: {sorted(RULES)}")
    return cls(naturalizer, **options)
