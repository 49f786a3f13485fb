"""Adversarial attacks on lipcert models, on top of torchattacks.

* ``attacks.registry``: short names (``fgsm``, ``pgd``, ``pgdl2``, ``apgd``, ``apgdl2``,
  ``autoattack``, ``autoattackl2``, ``cw``, ``deepfool``) → torchattacks classes with their
  defaults; ε grid parsing (``parse_eps("8/255,0.1")``).
* ``attacks.space`` / ``attacks.embedding``: where attacks run: images in [0, 1] directly,
  embedded text through an affine box map (torchattacks assumes [0, 1] images), and the
  final projection that keeps every perturbation within its ε.
* ``attacks.harness``: ``run_attacks`` → a per-sample table (``attacks.results``), written
  batch by batch to a resumable CSV; ``robust_accuracy`` as AutoAttack counts it.
* ``attacks.minimal``: the smallest L2 perturbation found per sample (empirical radius).
* ``attacks.audit``: certificates set against attacks; violations are soundness bugs.
  ``radius_audit`` attacks each sample with PGD-L2 at exactly its certified radius.
* ``attacks.run``: ``attack_models``, what ``lipcert attack`` does, as one call.
"""

import importlib
from typing import Any

# Exports are imported on first use (PEP 562), so `import attacks.registry` for the command
# line does not pull in torchattacks, pandas and rich until an attack actually runs.
_EXPORTS = {
    "Certificate": "attacks.audit", "certified_vs_robust": "attacks.audit",
    "find_violations": "attacks.audit", "load_certificate": "attacks.audit",
    "minimal_violations": "attacks.audit", "radius_audit": "attacks.audit",
    "radius_violations": "attacks.audit", "BallPGDL2": "attacks.audit",
    "attack_models": "attacks.run",
    "BatchedDeepFool": "attacks.deepfool", "EmbeddingBox": "attacks.embedding",
    "NextTokenClassifier": "attacks.embedding", "attack_accuracy": "attacks.harness",
    "robust_accuracy": "attacks.harness", "run_attacks": "attacks.harness",
    "minimal_perturbation": "attacks.minimal", "DEFAULT_ATTACKS": "attacks.registry",
    "DEFAULT_EPS_L2": "attacks.registry", "DEFAULT_EPS_LINF": "attacks.registry",
    "REGISTRY": "attacks.registry", "AttackSpec": "attacks.registry",
    "parse_attacks": "attacks.registry", "parse_eps": "attacks.registry",
    "resolve": "attacks.registry", "COLUMNS": "attacks.results",
    "read_results": "attacks.results", "AttackSpace": "attacks.space",
    "ImageSpace": "attacks.space", "measure": "attacks.space", "project": "attacks.space",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'attacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "COLUMNS",
    "DEFAULT_ATTACKS",
    "DEFAULT_EPS_L2",
    "DEFAULT_EPS_LINF",
    "REGISTRY",
    "AttackSpace",
    "AttackSpec",
    "BallPGDL2",
    "BatchedDeepFool",
    "Certificate",
    "EmbeddingBox",
    "ImageSpace",
    "NextTokenClassifier",
    "attack_accuracy",
    "attack_models",
    "certified_vs_robust",
    "find_violations",
    "load_certificate",
    "measure",
    "minimal_perturbation",
    "minimal_violations",
    "parse_attacks",
    "parse_eps",
    "project",
    "radius_audit",
    "radius_violations",
    "read_results",
    "resolve",
    "robust_accuracy",
    "run_attacks",
]
