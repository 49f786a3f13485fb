"""Every registered bound rule is exercised by the property tests.

The property cases of every ``RULE_CASES`` table (tests/test_bounds_rules*.py) are run with
each entry of the rule table wrapped by a recorder (``rules_harness.dispatched_rules``); the
union of the ops they dispatched must be every registered op, but for the few listed below,
which can never receive a value that depends on the model input. Each table's module runs its
cases with seeds ``SEED + index``; tables whose soundness test already ran in this session
are not run again (``rules_harness.COVERAGE``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from rules_harness import COVERAGE, check_rule

from lipcert.bounds import RULES

aten = torch.ops.aten

# ops whose rule can never receive a Bound, each with the reason
EXEMPT = {
    aten._assert_scalar: "takes a symbolic scalar, never a tensor",
    aten.sym_constrain_range: "takes a symbolic size, never a tensor",
    aten.sym_constrain_range_for_size: "takes a symbolic size, never a tensor",
    aten._assert_async: "asserts a boolean tensor, and no rule produces a boolean bound",
    aten.scalar_tensor: "builds a tensor from a Python scalar, never from a tensor",
}

_MODULES = sorted(p.stem for p in Path(__file__).parent.glob("test_bounds_rules*.py")
                  if p.stem != Path(__file__).stem)


def _tables() -> list[tuple[str, object]]:
    tables = []
    for name in _MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "RULE_CASES"):
            tables.append((name, module))
    return tables


def test_every_registered_op_has_a_property_case() -> None:
    seen: set = set()
    for name, module in _tables():
        for i, case in enumerate(module.RULE_CASES):
            key = (name, case)
            if key not in COVERAGE:
                check_rule(module.RULE_CASES[case], seed=module.SEED + i, record=key)
            seen |= COVERAGE[key]
    missing = sorted(str(op) for op in set(RULES) - seen - set(EXEMPT))
    assert not missing, f"registered ops without a property case: {missing}"
    stale = sorted(str(op) for op in set(EXEMPT) & seen)
    assert not stale, f"exempt ops that the cases do exercise: {stale}"
    unknown = sorted(str(op) for op in set(EXEMPT) - set(RULES))
    assert not unknown, f"exempt ops that have no rule: {unknown}"
