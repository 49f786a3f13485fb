"""Models people already have, with random weights from tiny configs (no hub access), for
``tests/test_third_party_models.py`` and ``benchmarks/coverage.py``.

Hugging Face ViT, DeiT, Swin, ConvNeXt, ResNet on pixels; BERT, DistilBERT, GPT-2 (KV cache
on, as configured by default) and a Llama-style decoder (RMSNorm, SwiGLU, rotary) on
``inputs_embeds``, wrapped to return the last position's logits (``LastTokenLogits``, the
wrapper a user exports); deel-torchlip's dense and convolutional networks after
``vanilla_export()``. ``prepare`` exports one (dynamic batch), saves it with
``torch.export.save`` and writes its samples (``--inputs``) and, for text, its embedding
table (``--embedding-table``); ``largest_jacobian_norm`` measures exact Jacobian spectral
norms of the eager model in float64, at the samples and at points found by gradient ascent
inside the set a bound covers; ``smallest_margin`` searches each certified ball for another
label.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

F64 = torch.float64
N_SAMPLES = 3
ASCENT_STEPS = 4


class PixelLogits(nn.Module):
    """An image classifier's logits from ``pixel_values``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits


class LastTokenLogits(nn.Module):
    """A language model's logits at the last position, from ``inputs_embeds`` (B, T, d):
    the (B, vocabulary) classifier of the next token that lipcert certifies."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=inputs_embeds).logits[:, -1, :]


@dataclass
class Arch:
    build: Callable[[], nn.Module]
    kind: str  # "pixels", "text" or "deel"
    shape: tuple[int, ...]  # pixels: (C, H, W); text: (T,), the sequence length


def _hf(cls: str, config: str, **kw) -> nn.Module:
    import transformers

    return getattr(transformers, cls)(getattr(transformers, config)(**kw))


def deel_dense(hidden: int = 32, inputs: int = 784, classes: int = 10) -> nn.Module:
    """deel-torchlip's dense net (SpectralLinear + GroupSort2), after ``vanilla_export()``."""
    from deel import torchlip

    return torchlip.Sequential(
        nn.Flatten(), torchlip.SpectralLinear(inputs, hidden), torchlip.GroupSort2(),
        torchlip.SpectralLinear(hidden, hidden), torchlip.GroupSort2(),
        torchlip.SpectralLinear(hidden, classes)).vanilla_export()


def deel_conv(c1: int = 4, c2: int = 8, hidden: int = 16, classes: int = 10) -> nn.Module:
    """deel-torchlip's convolutional net of its HKR tutorial (SpectralConv2d, GroupSort2,
    ScaledL2NormPool2d) on 1×28×28 inputs, after ``vanilla_export()``."""
    from deel import torchlip

    return torchlip.Sequential(
        torchlip.SpectralConv2d(1, c1, (3, 3), padding="same"), torchlip.GroupSort2(),
        torchlip.ScaledL2NormPool2d(kernel_size=(2, 2)),
        torchlip.SpectralConv2d(c1, c2, (3, 3), padding="same"), torchlip.GroupSort2(),
        torchlip.ScaledL2NormPool2d(kernel_size=(2, 2)), nn.Flatten(),
        torchlip.SpectralLinear(c2 * 7 * 7, hidden), torchlip.GroupSort2(),
        torchlip.SpectralLinear(hidden, classes, bias=False)).vanilla_export()


TEXT = {"vocab_size": 40}
ARCHS = {
    "vit": Arch(lambda: PixelLogits(_hf(
        "ViTForImageClassification", "ViTConfig", image_size=28, patch_size=7,
        num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=10)), "pixels", (1, 28, 28)),
    "deit": Arch(lambda: PixelLogits(_hf(
        "DeiTForImageClassification", "DeiTConfig", image_size=28, patch_size=7,
        num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=10)), "pixels", (1, 28, 28)),
    "swin": Arch(lambda: PixelLogits(_hf(
        "SwinForImageClassification", "SwinConfig", image_size=32, patch_size=4,
        num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
        num_labels=10)), "pixels", (3, 32, 32)),
    "convnext": Arch(lambda: PixelLogits(_hf(
        "ConvNextForImageClassification", "ConvNextConfig", num_channels=3, num_stages=2,
        hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)), "pixels", (3, 32, 32)),
    "resnet": Arch(lambda: PixelLogits(_hf(
        "ResNetForImageClassification", "ResNetConfig", num_channels=3, embedding_size=16,
        hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10)),
        "pixels", (3, 32, 32)),
    "bert": Arch(lambda: LastTokenLogits(_hf(
        "BertForMaskedLM", "BertConfig", hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16, **TEXT)),
        "text", (5,)),
    "distilbert": Arch(lambda: LastTokenLogits(_hf(
        "DistilBertForMaskedLM", "DistilBertConfig", dim=16, n_layers=1, n_heads=2,
        hidden_dim=32, max_position_embeddings=16, **TEXT)), "text", (5,)),
    "gpt2": Arch(lambda: LastTokenLogits(_hf(
        "GPT2LMHeadModel", "GPT2Config", n_embd=16, n_layer=1, n_head=2, n_positions=16,
        bos_token_id=0, eos_token_id=0, **TEXT)), "text", (5,)),
    "llama": Arch(lambda: LastTokenLogits(_hf(
        "LlamaForCausalLM", "LlamaConfig", hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=16, **TEXT)), "text", (5,)),
    "deel-dense": Arch(deel_dense, "deel", (1, 28, 28)),
    "deel-conv": Arch(deel_conv, "deel", (1, 28, 28)),
}


# --------------------------------------------------------------------------- preparing


@dataclass
class Prepared:
    """A model exported to ``pt2``, with its eager float64 copy, samples and domain."""

    model64: nn.Module
    pt2: Path
    x: torch.Tensor
    y: torch.Tensor
    domain_args: list[str]
    project: Callable[[torch.Tensor], torch.Tensor]  # onto the domain


def embedding_table(model: nn.Module) -> torch.Tensor:
    return model.model.get_input_embeddings().weight.detach()


def prepare(name: str, tmp: Path, seed: int = 0) -> Prepared:
    """Build ``name`` with random weights, export and save it, and write the samples (the
    model's own predictions as labels) and, for text, the embedding table."""
    torch.manual_seed(seed)
    arch = ARCHS[name]
    model = arch.build().eval()
    g = torch.Generator().manual_seed(seed)
    if arch.kind == "text":
        table = embedding_table(model)
        tokens = torch.randint(0, table.shape[0], (N_SAMPLES, *arch.shape), generator=g)
        x = table[tokens].clone()
        save_file({"table": table.contiguous()}, tmp / "table.safetensors")
        domain_args = ["--embedding-table", str(tmp / "table.safetensors")]
        radius = float(torch.linalg.vector_norm(table.double(), dim=1).max())

        def project(v: torch.Tensor) -> torch.Tensor:
            norms = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
            return v * torch.clamp(radius / norms.clamp_min(1e-30), max=1.0)
    else:
        x = torch.rand(N_SAMPLES, *arch.shape, generator=g)
        domain_args = ["--domain", "box:0,1"]

        def project(v: torch.Tensor) -> torch.Tensor:
            return v.clamp(0.0, 1.0)
    with torch.no_grad():
        y = model(x).argmax(1)
    save_file({"x": x.contiguous(), "y": y}, tmp / "inputs.safetensors")
    program = torch.export.export(model, (x[:2],),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    pt2 = tmp / f"{name}.pt2"
    torch.export.save(program, pt2)
    model64 = model.double()
    if arch.kind != "deel":  # the same function; CPU SDPA kernels have no double backward
        model64.model.set_attn_implementation("eager")
    return Prepared(model64, pt2, x, y, domain_args, project)


# --------------------------------------------------------------------------- Jacobians


def jacobian_norms(model64: nn.Module, x: torch.Tensor, create_graph: bool = False
                   ) -> torch.Tensor:
    """‖J(x_i)‖₂ of each sample's logits with respect to its input, float64."""
    norms = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda v: model64(v[None])[0], xi,
                                               create_graph=create_graph)
        norms.append(torch.linalg.matrix_norm(J.reshape(J.shape[0], -1), ord=2))
    return torch.stack(norms)


def largest_jacobian_norm(p: Prepared, centers: torch.Tensor, radii: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the Jacobian norm at the centre, and the largest found by gradient ascent
    from a random start inside its set (the domain, intersected with the ball of radius
    r_i around the centre when ``radii`` is given)."""
    g = torch.Generator().manual_seed(1)
    at_centre = jacobian_norms(p.model64, centers.to(F64)).detach()
    x = centers.to(F64) + 0.05 * torch.randn(centers.shape, generator=g, dtype=F64)

    def into_set(v: torch.Tensor) -> torch.Tensor:
        v = p.project(v)
        if radii is None:
            return v
        d = v - centers.to(F64)
        n = d.flatten(1).norm(dim=1).clamp_min(1e-300)
        shrink = torch.clamp(radii.to(F64) / n, max=1.0).reshape(-1, *[1] * (d.dim() - 1))
        return p.project(centers.to(F64) + d * shrink)

    x = into_set(x)
    best = torch.zeros(len(x), dtype=F64)
    for _ in range(ASCENT_STEPS):
        x = x.detach().requires_grad_(True)
        norms = jacobian_norms(p.model64, x, create_graph=True)
        best = torch.maximum(best, norms.detach())
        # piecewise-linear models have Jacobians constant in x: a zero gradient
        (grad,) = torch.autograd.grad(norms.sum(), x, allow_unused=True, materialize_grads=True)
        grad = grad + 1e-3 * torch.randn(grad.shape, generator=g, dtype=F64)
        step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(
            -1, *[1] * (x.dim() - 1))
        x = into_set(x.detach() + 0.1 * step)
    best = torch.maximum(best, jacobian_norms(p.model64, x).detach())
    return at_centre, best


def smallest_margin(p: Prepared, radii: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """Per sample, the smallest margin z_y − max_{j≠y} z_j that projected gradient descent
    (two random starts) finds on B(x, r) ∩ domain, on the eager float64 model."""
    g = torch.Generator().manual_seed(2)
    x0 = p.x.to(F64)
    shape = (-1, *[1] * (x0.dim() - 1))

    def margins(v: torch.Tensor) -> torch.Tensor:
        z = p.model64(v)
        own = z.gather(1, p.y[:, None]).squeeze(1)
        return own - z.scatter(1, p.y[:, None], -math.inf).amax(1)

    def into_set(v: torch.Tensor) -> torch.Tensor:
        d = p.project(v) - x0
        f = torch.clamp(radii / d.flatten(1).norm(dim=1).clamp_min(1e-300), max=1.0)
        return p.project(x0 + d * f.reshape(shape))

    best = torch.full((len(x0),), math.inf, dtype=F64)
    for _ in range(2):
        x = into_set(x0 + radii.reshape(shape) * torch.randn(x0.shape, generator=g, dtype=F64))
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            m = margins(x)
            best = torch.minimum(best, m.detach())
            (grad,) = torch.autograd.grad(m.sum(), x)
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(shape)
            x = into_set(x.detach() - 0.1 * radii.reshape(shape) * step)
        with torch.no_grad():
            best = torch.minimum(best, margins(x))
    return best

