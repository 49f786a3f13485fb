"""``torch.optim.Muon``, with its Newton–Schulz orthogonalisation in float32 on CPUs that
have no native bfloat16 matrix multiply.

Muon (Jordan et al. 2024) replaces each 2-D update M (the Nesterov momentum of the
gradient) by an approximation of its orthogonal polar factor U Vᵀ (M = U S Vᵀ): five steps
of the quintic Newton–Schulz iteration X ← a·X + (b·A + c·A²)·X, A = X Xᵀ, from
X₀ = M / ‖M‖_F, with (a, b, c) = (3.4445, −4.7750, 2.0315). torch runs that iteration in
bfloat16, which is fast on GPUs and on CPUs with AVX512-BF16 or AMX, but emulated on others:
on an AVX2 core a 256×3072 Gram product takes 81 ms in bfloat16 and 13 ms in float32, and
the iteration was 85% of a certified-ViT training step at d 192. torch offers no option
for the iteration's dtype, so on such CPUs this class runs the same algorithm (same
momentum, Nesterov, coefficients, steps, decoupled decay and learning-rate adjustment, as
``torch.optim.Muon`` documents them) in float32, which is also more accurate; everywhere
else it is torch's Muon unchanged.

Only public torch APIs are used, except ``torch.ops.mkldnn._is_mkldnn_bf16_supported`` (the
CPU's bfloat16 support; torch has no public query). Because the float32 path re-implements
torch's step, it is used only with the torch versions in :data:`TESTED_TORCH`, where the
tests compare it with ``torch.optim.Muon``; with any other torch, :class:`Muon` warns once
and is ``torch.optim.Muon`` unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lipcert.errors import LipcertError

#: [first, last) torch (major, minor) versions the float32 path is tested against.
TESTED_TORCH: tuple[tuple[int, int], tuple[int, int]] = ((2, 13), (2, 15))


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The learning rate torch's Muon applies to a weight of ``shape`` (A, B): ``"original"``
    or ``None``: lr·√max(1, A/B) (Keller Jordan's); ``"match_rms_adamw"``: lr·0.2·√max(A, B)
    (Moonshot's), as ``torch.optim.Muon`` documents them."""
    fan_out, fan_in = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, fan_out / fan_in))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(fan_out, fan_in))
    else:
        ratio = 1.0
    return lr * ratio


def torch_is_tested(version: str = torch.__version__) -> bool:
    """Whether ``version`` lies in :data:`TESTED_TORCH`."""
    v = torch.torch_version.TorchVersion(version)
    low, high = TESTED_TORCH
    return low <= v < high


def native_bfloat16_matmul(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively on ``device`` (always on CUDA)."""
    return device.type != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def orthogonalize(update: Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> Tensor:
    """Quintic Newton–Schulz iteration towards U Vᵀ, in float32 (see the module docstring)."""
    a, b, c = coefficients
    x = update.float()
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.mT
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.mT).to(update.dtype)


class Muon(torch.optim.Muon):
    """torch's Muon; on CPUs without native bfloat16 matmul, Newton–Schulz in float32
    (with a torch version in :data:`TESTED_TORCH`; with any other, torch's Muon unchanged)."""

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self._float32_allowed = torch_is_tested()
        if not self._float32_allowed:
            warnings.warn(
                f"lipcert.muon: torch {torch.__version__} is outside the versions its float32 "
                f"Newton–Schulz path is tested with ({TESTED_TORCH[0]} to {TESTED_TORCH[1]}, "
                "exclusive); using torch.optim.Muon unchanged (slower on CPUs without native "
                "bfloat16)",
                RuntimeWarning,
                stacklevel=2,
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        params = [p for g in self.param_groups for p in g["params"]]
        if (not self._float32_allowed or not params
                or native_bfloat16_matmul(params[0].device)):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse or param.is_complex():
                    raise LipcertError("Muon supports real, dense gradients only")
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"],
                                       group["eps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss
