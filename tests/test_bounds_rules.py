"""Soundness of every bound rule: seeded random property tests plus gradient-ascent searches
(the harness and what it checks: tests/rules_harness.py), and specific checks of single
rules."""

from __future__ import annotations

import math
import operator

import pytest
import torch
from rules_harness import (
    BoundCall,
    Case,
    Program,
    check_rule,
    maybe,
    real_call,
    ri,
    weight,
)
from torch import Tensor

from lipcert.bounds import (
    BatchMixingError,
    BoxDomain,
    Const,
    Ctx,
    EmbeddingDomain,
    UnsupportedOpError,
    input_bound,
)
from lipcert.bounds.rules.activation import GELU_MAX_SLOPE
from lipcert.bounds.rules.attention import mask_mass

aten = torch.ops.aten
F64 = torch.float64
SEED = 1000  # + the index of a RULE_CASES entry


# --------------------------------------------------------------------------- programs


def case_linear(g):
    t, i, o = ri(g, 1, 3), ri(g, 1, 5), ri(g, 1, 5)
    W = weight(g, o, i, 2.0)
    b = torch.randn(o, generator=g, dtype=F64) if maybe(g) else None
    return Case(lambda call, z: call(aten.linear.default, z, W, b), (t, i))


def case_matmul_const(g):
    k, m, t = ri(g, 1, 4), ri(g, 1, 4), ri(g, 1, 3)
    kind = ri(g, 0, 3)
    if kind == 0:  # x @ W
        W = weight(g, k, m, 2.0)
        return Case(lambda call, z: call(aten.matmul.default, z, W), (t, k))
    if kind == 1:  # A @ x (columns)
        A = weight(g, t + 1, t, 2.0)
        return Case(lambda call, z: call(aten.matmul.default, A, z), (t, k))
    if kind == 2:  # addmm on 2-D
        W, bias = weight(g, k, m), torch.randn(m, generator=g, dtype=F64)
        return Case(lambda call, z: call(aten.addmm.default, bias, z, W, beta=0.5, alpha=2.0),
                    (k,))
    W = weight(g, k, m)  # vector @ matrix on 2-D input via mm
    return Case(lambda call, z: call(aten.mm.default, z, W), (k,))


def case_matmul_two(g):
    t, d, k = ri(g, 1, 3), ri(g, 1, 4), ri(g, 1, 3)
    W1, W2 = weight(g, k, d), weight(g, k, d)
    op = aten.bmm.default if maybe(g) else aten.matmul.default
    add_bias = maybe(g, 0.3)
    bias = torch.randn(t, t, generator=g, dtype=F64)

    def prog(call, z):
        a = call(aten.linear.default, z, W1)
        b = call(aten.linear.default, z, W2)
        bt = call(aten.transpose.int, b, 1, 2)
        if add_bias:
            return call(aten.baddbmm.default, bias, a, bt, beta=0.5, alpha=-1.5)
        return call(op, a, bt)

    return Case(prog, (t, d), width=0.7)


def case_conv(g):
    c_in, c_out = ri(g, 1, 2), ri(g, 1, 3)
    groups = 1
    if c_in == 2 and c_out % 2 == 0 and maybe(g):
        groups = 2
    if maybe(g, 0.3):  # conv1d
        L, k = ri(g, 2, 6), ri(g, 1, 3)
        W = torch.randn(c_out, c_in // groups, k, generator=g, dtype=F64)
        s, p, d = ri(g, 1, 2), ri(g, 0, 1), ri(g, 1, 2)
        if (L + 2 * p - d * (k - 1) - 1) < 0:
            p = k
        return Case(lambda call, z: call(aten.conv1d.default, z, W, None, [s], [p], [d], groups),
                    (c_in, L))
    H, Wd, k = ri(g, 2, 5), ri(g, 2, 5), ri(g, 1, 3)
    W = torch.randn(c_out, c_in // groups, k, k, generator=g, dtype=F64)
    b = torch.randn(c_out, generator=g, dtype=F64) if maybe(g) else None
    s, p, d = ri(g, 1, 2), ri(g, 0, 1), ri(g, 1, 2)
    if min(H, Wd) + 2 * p - d * (k - 1) - 1 < 0:
        p = d * (k - 1)
    if maybe(g, 0.3):
        return Case(lambda call, z: call(aten.convolution.default, z, W, b, [s, s], [p, p],
                                         [d, d], False, [0, 0], groups), (c_in, H, Wd))
    return Case(lambda call, z: call(aten.conv2d.default, z, W, b, [s, s], [p, p], [d, d], groups),
                (c_in, H, Wd))


def case_layer_norm(g):
    t, d = ri(g, 1, 3), ri(g, 2, 5)
    two = maybe(g, 0.25)
    shape = [t, d] if two else [d]
    gamma = torch.randn(shape, generator=g, dtype=F64) if maybe(g) else None
    beta = torch.randn(shape, generator=g, dtype=F64) if maybe(g) else None
    eps = float(10 ** torch.empty(()).uniform_(-3, 0, generator=g))
    native = maybe(g)

    def prog(call, z):
        if native:
            out = call(aten.native_layer_norm.default, z, shape, gamma, beta, eps)
            return call(operator.getitem, out, 0)
        return call(aten.layer_norm.default, z, shape, gamma, beta, eps)

    return Case(prog, (t, d), offset=2.0, width=float(torch.empty(()).uniform_(0.05, 1.5,
                                                                              generator=g)))


def case_rms_norm(g):
    t, d = ri(g, 1, 3), ri(g, 1, 5)
    w = torch.randn(d, generator=g, dtype=F64) if maybe(g) else None
    eps = float(10 ** torch.empty(()).uniform_(-3, 0, generator=g))
    return Case(lambda call, z: call(aten.rms_norm.default, z, [d], w, eps), (t, d), offset=2.0,
                width=0.6)


def case_batch_norm(g):
    c, h = ri(g, 1, 3), ri(g, 1, 3)
    mean = torch.randn(c, generator=g, dtype=F64)
    var = torch.rand(c, generator=g, dtype=F64) + 0.05
    w = torch.randn(c, generator=g, dtype=F64) if maybe(g) else None
    b = torch.randn(c, generator=g, dtype=F64) if maybe(g) else None
    if maybe(g):
        return Case(lambda call, z: call(aten.batch_norm.default, z, w, b, mean, var, False, 0.1,
                                         1e-5, False), (c, h, 2))

    def prog(call, z):
        out = call(aten._native_batch_norm_legit_no_training.default, z, w, b, mean, var, 0.1,
                   1e-5)
        return call(operator.getitem, out, 0)

    return Case(prog, (c, h))


def case_sdpa(g):
    t, h, dh = ri(g, 1, 4), ri(g, 1, 2), ri(g, 1, 3)
    d = h * dh
    kv = ri(g, 0, 2)  # 0: one k/v head per query head, 1: shared (broadcast), 2: GQA
    if kv and h == 1:
        h, d = 2, 2 * dh
    hk = h if kv == 0 else 1
    Wq = weight(g, d, d, 1.5)
    Wk, Wv = (weight(g, hk * dh, d, 1.5) for _ in range(2))
    bq = torch.randn(d, generator=g, dtype=F64) if maybe(g) else None
    causal = maybe(g)
    scale = None if maybe(g) else float(torch.rand((), generator=g)) * 3
    mask = None
    if not causal and maybe(g, 0.4):
        kind = ri(g, 0, 2)
        if kind == 0:  # boolean; rows with every key masked give zeros
            mask = torch.rand(t, t, generator=g) < 0.7
            if maybe(g, 0.7):
                mask[:, 0] = True
        elif kind == 1:  # additive
            mask = torch.randn(t, t, generator=g, dtype=F64)
        else:  # additive with −inf entries, broadcast over heads, possibly whole rows
            mask = torch.randn(1, t, t, generator=g, dtype=F64)
            mask = mask.masked_fill(torch.rand(1, t, t, generator=g) < 0.4, -math.inf)

    def prog(call, z):
        B = z.shape[0]

        def heads(w, n_heads, b=None):
            y = call(aten.linear.default, z, w, b)
            y = call(aten.view.default, y, [B, t, n_heads, dh])
            return call(aten.transpose.int, y, 1, 2)

        q, k, v = heads(Wq, h, bq), heads(Wk, hk), heads(Wv, hk)
        kw = {"scale": scale} if scale is not None else {}
        if kv == 2:
            kw["enable_gqa"] = True
        y = call(aten.scaled_dot_product_attention.default, q, k, v, mask, 0.0, causal, **kw)
        y = call(aten.transpose.int, y, 1, 2)
        return call(aten.reshape.default, y, [B, t, d])

    return Case(prog, (t, d), width=float(torch.empty(()).uniform_(0.05, 1.0, generator=g)))


def case_softmax(g):
    t, d = ri(g, 1, 3), ri(g, 1, 5)
    W = weight(g, d, d, 3.0)
    dim = ri(g, 1, 2)

    def prog(call, z):
        y = call(aten.linear.default, z, W)
        if _flip[0]:
            return call(aten._softmax.default, y, dim, False)
        return call(aten.softmax.int, y, -1)

    _flip = [maybe(g)]
    return Case(prog, (t, d))


_POINTWISE = {
    "gelu": (lambda call, z: call(aten.gelu.default, z), False),
    "gelu_tanh": (lambda call, z: call(aten.gelu.default, z, approximate="tanh"), False),
    "relu": (lambda call, z: call(aten.relu.default, z), False),
    "silu": (lambda call, z: call(aten.silu.default, z), False),
    "tanh": (lambda call, z: call(aten.tanh.default, z), False),
    "sigmoid": (lambda call, z: call(aten.sigmoid.default, z), False),
    "leaky_relu": (lambda call, z: call(aten.leaky_relu.default, z, 0.2), False),
    "hardtanh": (lambda call, z: call(aten.hardtanh.default, z, -0.5, 1.0), False),
    "clamp": (lambda call, z: call(aten.clamp.default, z, -0.3, None), False),
    "abs": (lambda call, z: call(aten.abs.default, z), False),
    "exp": (lambda call, z: call(aten.exp.default, z), False),
    "neg": (lambda call, z: call(aten.neg.default, z), False),
    "square": (lambda call, z: call(aten.pow.Tensor_Scalar, z, 2), False),
    "sqrt": (lambda call, z: call(aten.sqrt.default, z), True),
    "rsqrt": (lambda call, z: call(aten.rsqrt.default, z), True),
    "reciprocal": (lambda call, z: call(aten.reciprocal.default, z), True),
    "pow1.5": (lambda call, z: call(aten.pow.Tensor_Scalar, z, 1.5), True),
    "dropout_eval": (lambda call, z: call(aten.dropout.default, z, 0.3, False), False),
    "native_dropout_eval": (
        lambda call, z: call(operator.getitem, call(aten.native_dropout.default, z, 0.3, False), 0),
        False,
    ),
    "clip": (lambda call, z: call(aten.clip.default, z, None, 0.4), False),
}


def make_pointwise(name):
    fn, pos = _POINTWISE[name]

    def make(g):
        t, d = ri(g, 1, 3), ri(g, 1, 4)
        if pos or maybe(g, 0.4):
            return Case(fn, (t, d), pos=pos, offset=2.0, width=float(
                torch.empty(()).uniform_(0.1, 2.0, generator=g)))
        W = weight(g, d, d, 2.0)

        def prog(call, z):  # correlated inputs through a linear layer
            return fn(call, call(aten.linear.default, z, W))

        return Case(prog, (t, d), offset=2.0)

    return make


def case_arith(g):
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    W1, W2 = weight(g, d, d), weight(g, d, d)
    c = torch.randn(d, generator=g, dtype=F64)
    kind = ri(g, 0, 9)

    def prog(call, z):
        a = call(aten.linear.default, z, W1)
        b = call(aten.linear.default, z, W2)
        if kind == 8:  # SwiGLU: silu(a)·b, a product of activations
            return call(aten.mul.Tensor, call(aten.silu.default, a), b)
        if kind == 9:  # a tensor times itself is its square
            return call(aten.mul.Tensor, a, a)
        if kind == 0:
            return call(aten.add.Tensor, a, b, alpha=-0.5)
        if kind == 1:
            return call(aten.sub.Tensor, a, c)
        if kind == 2:
            return call(aten.mul.Tensor, a, b)
        if kind == 3:
            return call(aten.mul.Tensor, a, c)
        if kind == 4:
            return call(aten.div.Tensor, a, c.abs() + 0.5)
        if kind == 5:
            e = call(aten.exp.default, b)
            return call(aten.div.Tensor, a, e)
        if kind == 6:
            return call(aten.rsub.Scalar, a, 2.0, alpha=3.0)
        s = call(aten.mean.dim, a, [1], True)  # broadcast of an activation
        return call(aten.add.Tensor, b, s)

    return Case(prog, (t, d), width=0.8)


def case_reduce(g):
    shape = tuple(ri(g, 1, 3) for _ in range(ri(g, 1, 3)))
    dims = [i + 1 for i in range(len(shape)) if maybe(g)] or [len(shape)]
    keep = maybe(g)
    op = aten.mean.dim if maybe(g) else aten.sum.dim_IntList
    W = weight(g, shape[-1], shape[-1])

    def prog(call, z):
        y = call(aten.linear.default, z, W)
        return call(op, y, dims, keep)

    return Case(prog, shape)


def case_shape(g):
    """One random shape op after an optional expand (lip_tok < lip) and a linear layer."""
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    rep = ri(g, 1, 3)
    W = weight(g, d, d)
    W2 = weight(g, d, d)
    kind = ri(g, 0, 31)
    idx = torch.randint(0, d, (d + 1,), generator=g)

    def prog(call, z):
        B = z.shape[0]
        y = call(aten.linear.default, z, W)  # (B, t, d)
        y = call(aten.unsqueeze.default, y, 1)  # (B, 1, t, d)
        y = call(aten.expand.default, y, [B, rep, t, d])  # lip = √rep·lip_tok
        if kind == 0:
            return call(aten.reshape.default, y, [B, rep * t * d])
        if kind == 1:
            return call(aten.permute.default, y, [0, 3, 1, 2])
        if kind == 2:
            return call(aten.transpose.int, y, 2, 3)
        if kind == 3:
            return call(aten.flatten.using_ints, y, 1, 2)
        if kind == 4:
            return call(aten.unflatten.int, y, 1, [rep, 1])
        if kind == 5:
            return call(aten.squeeze.dim, call(aten.unsqueeze.default, y, -1), -1)
        if kind == 6:
            return call(aten.select.int, y, 2, t - 1)
        if kind == 7:
            return call(aten.slice.Tensor, y, 3, 0, d, 2)
        if kind == 8:
            y2 = call(aten.linear.default, z, W2)
            return call(aten.cat.default, [call(aten.select.int, y, 1, 0), y2], -1)
        if kind == 9:
            y2 = call(aten.linear.default, z, W2)
            return call(aten.stack.default, [call(aten.select.int, y, 1, 0), y2], 1)
        if kind == 10:
            parts = call(aten.split.Tensor, y, 1, -1)
            return call(operator.getitem, parts, 0)
        if kind == 11:
            return call(aten.clone.default, call(aten.contiguous.default, y))
        if kind == 12:
            return call(aten.repeat.default, y, [1, 1, 2, 1])
        if kind == 13:
            return call(aten.flip.default, y, [2, 3])
        if kind == 14:
            return call(aten.index_select.default, y, 3, idx)
        if kind == 15:
            return call(aten.constant_pad_nd.default, y, [1, 2], 0.0)
        if kind == 16:
            return call(aten.constant_pad_nd.default, y, [1, 0, 0, 1], 1.5)
        if kind == 17:
            return call(aten.unfold.default, y, 3, min(2, d), 1)
        if kind == 18:
            return call(aten.roll.default, y, [1], [3])
        if kind == 20:
            return call(aten.narrow.default, y, 3, 0, max(1, d - 1))
        if kind == 21:
            return call(operator.getitem, call(aten.chunk.default, y, 2, 2), 0)
        if kind == 22:
            return call(operator.getitem, call(aten.unbind.int, y, 2), t - 1)
        if kind == 23:
            return call(aten.movedim.int, y, 3, 1)
        if kind == 24:
            return call(aten.repeat_interleave.self_int, y, 2, 3)
        if kind == 25:
            return call(aten.index.Tensor, y, [None, None, None, idx])
        if kind == 26:
            return call(aten.diagonal.default, y, 0, 2, 3)
        if kind == 27:
            return call(aten.pad.default, call(aten.reshape.default, y, [B, rep * t, d]), [1, 1],
                        "reflect" if d > 1 else "replicate")
        if kind == 28:
            return call(operator.getitem, call(aten.tensor_split.sections, y, 2, 3), 0)
        if kind == 29:
            return call(aten._to_copy.default, call(aten.expand_as.default, y, y), dtype=F64)
        if kind == 30:
            return call(aten.hstack.default, [y, y])
        return call(aten.cat.default, [y, y], 1)

    if kind == 31:
        return Case(lambda call, z: call(aten.linear.default, z, W), (t, d))
    return Case(prog, (t, d))


def case_pool(g):
    c, H, Wd = ri(g, 1, 2), ri(g, 2, 6), ri(g, 2, 6)
    k = ri(g, 1, min(3, H, Wd))
    s = ri(g, 1, 3)
    p = ri(g, 0, k // 2)
    kind = ri(g, 0, 13)
    ceil = maybe(g)
    if kind >= 7:
        return _pool_more(g, kind, c, k, s, p, ceil)
    if kind == 0:
        d = ri(g, 1, 2)
        if (k - 1) * d + 1 > min(H, Wd):
            d = 1
        return Case(lambda call, z: call(aten.max_pool2d.default, z, [k, k], [s, s], [p, p],
                                         [d, d], ceil), (c, H, Wd))
    if kind == 1:
        def prog(call, z):
            out = call(aten.max_pool2d_with_indices.default, z, [k, k], [s, s], [p, p])
            return call(operator.getitem, out, 0)

        return Case(prog, (c, H, Wd))
    if kind == 2:
        inc = maybe(g)
        return Case(lambda call, z: call(aten.avg_pool2d.default, z, [k, k], [s, s], [p, p],
                                         ceil, inc), (c, H, Wd))
    if kind == 3:
        o = [ri(g, 1, H), ri(g, 1, Wd)]
        return Case(lambda call, z: call(aten.adaptive_avg_pool2d.default, z, o), (c, H, Wd))
    if kind == 4:
        return Case(lambda call, z: call(aten.max_pool1d.default, z, [k], [s], [p]), (c, H))
    if kind == 5:
        return Case(lambda call, z: call(aten.avg_pool1d.default, z, [k], [s], [p], ceil),
                    (c, H))
    o1 = ri(g, 1, H)
    return Case(lambda call, z: call(aten.adaptive_avg_pool1d.default, z, [o1]), (c, H))


def _pool_more(g, kind, c, k, s, p, ceil):
    """The 1-D with-indices, 3-D and underscore variants of the pooling ops."""
    D, H, Wd = (ri(g, k, 4) for _ in range(3))

    def values(op, *args):
        def prog(call, z):
            return call(operator.getitem, call(op, z, *args), 0)

        return prog

    if kind == 7:
        return Case(values(aten.max_pool1d_with_indices.default, [k], [s], [p]), (c, H))
    if kind == 8:
        return Case(lambda call, z: call(aten.max_pool3d.default, z, [k] * 3, [s] * 3, [p] * 3,
                                         [1] * 3, ceil), (c, D, H, Wd))
    if kind == 9:
        return Case(values(aten.max_pool3d_with_indices.default, [k] * 3, [s] * 3, [p] * 3),
                    (c, D, H, Wd))
    if kind == 10:
        inc = maybe(g)
        return Case(lambda call, z: call(aten.avg_pool3d.default, z, [k] * 3, [s] * 3, [p] * 3,
                                         ceil, inc), (c, D, H, Wd))
    o = [ri(g, 1, D), ri(g, 1, H), ri(g, 1, Wd)]
    if kind == 11:
        return Case(lambda call, z: call(aten.adaptive_avg_pool3d.default, z, o), (c, D, H, Wd))
    if kind == 12:
        return Case(lambda call, z: call(aten._adaptive_avg_pool3d.default, z, o), (c, D, H, Wd))
    return Case(lambda call, z: call(aten._adaptive_avg_pool2d.default, z, o[1:]), (c, H, Wd))


def case_shape_more(g):
    """More shape ops (the same generic rule), including concatenation with an empty
    constant (a GPT-2's empty KV cache) and with an empty activation."""
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    W, W2 = weight(g, d, d), weight(g, d, d)
    kind = ri(g, 0, 8)
    empty = torch.zeros(0, dtype=F64)

    def prog(call, z):
        B = z.shape[0]
        y = call(aten.linear.default, z, W)  # (B, t, d)
        y2 = call(aten.linear.default, z, W2)
        if kind == 0:
            return call(aten.concat.default, [y, y2], 1)
        if kind == 1:  # stacks tokens: the batch moved out of dimension 0 and back
            ys = [call(aten.transpose.int, a, 0, 1) for a in (y, y2)]
            return call(aten.transpose.int, call(aten.vstack.default, ys), 0, 1)
        if kind == 2:
            parts = call(aten.split_with_sizes.default, y, [1, t - 1] if t > 1 else [1], 1)
            return call(operator.getitem, parts, len(parts) - 1)
        if kind == 3:
            flat = call(aten.reshape.default, y, [B, t * d])
            return call(aten.t.default, call(aten.t.default, flat))
        if kind == 4:
            return call(aten.view_copy.default, y, [B, d, t])
        if kind == 5:
            return call(aten._unsafe_view.default, y, [B, t * d])
        if kind == 6:
            return call(aten.cat.default, [empty, y, empty], -2)
        if kind == 7:
            none = call(aten.slice.Tensor, y2, 1, 0, 0)  # (B, 0, d)
            return call(aten.cat.default, [none, y], 1)
        parts = call(aten.tensor_split.indices, y, [1], -1)
        return call(operator.getitem, parts, 0 if d == 1 else 1)

    return Case(prog, (t, d))


def case_identity(g):
    """The ops that return their input (copies, aliases, float conversions, a metadata
    assertion before a copy)."""
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    W = weight(g, d, d, 2.0)
    kind = ri(g, 0, 11)
    other = torch.zeros(1, dtype=F64)

    def prog(call, z):
        y = call(aten.linear.default, z, W)
        if kind == 0:
            return call(aten.clone.default, y)
        if kind == 1:
            return call(aten.contiguous.default, y)
        if kind == 2:
            return call(aten.alias.default, y)
        if kind == 3:
            return call(aten.detach.default, y)
        if kind == 4:
            return call(aten.lift_fresh_copy.default, y)
        if kind == 5:
            return call(aten.lift_fresh.default, y)
        if kind == 6:
            return call(aten._to_copy.default, y, dtype=F64)
        if kind == 7:
            return call(aten.to.dtype, y, F64)
        if kind == 8:
            return call(aten.type_as.default, y, other)
        if kind == 9:
            return call(aten.alias_copy.default, y)
        if kind == 10:
            return call(aten.detach_copy.default, y)
        call(aten._assert_tensor_metadata.default, y, dtype=F64)
        return call(aten.clone.default, y)

    return Case(prog, (t, d))


def case_sizes(g):
    """Shape queries of an activation, used to reshape it."""
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    W = weight(g, d, d, 2.0)
    kind = ri(g, 0, 5)

    def prog(call, z):
        B = z.shape[0]
        y = call(aten.linear.default, z, W)  # (B, t, d), contiguous
        if kind == 0:
            return call(aten.reshape.default, y, [B, -1, call(aten.sym_size.int, y, 2)])
        if kind == 1:
            return call(aten.reshape.default, y, [B, call(aten.sym_numel.default, y) // B])
        if kind == 2:
            return call(aten.reshape.default, y, [B, call(aten.sym_stride.int, y, 0)])
        if kind == 3:
            return call(aten.reshape.default, y, [B, call(aten.size.int, y, 1), -1])
        if kind == 4:
            return call(aten.reshape.default, y, [B, call(aten.numel.default, y) // B])
        return call(aten.flatten.using_ints, y, 1, call(aten.dim.default, y) - 1)

    return Case(prog, (t, d))


def case_like(g):
    """Ops that use only an activation's shape (their results are constants)."""
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    W = weight(g, d, d, 2.0)
    kind = ri(g, 0, 7)

    def prog(call, z):
        y = call(aten.linear.default, z, W)
        if kind == 0:
            c = call(aten.zeros_like.default, y)
        elif kind == 1:
            c = call(aten.ones_like.default, y)
        elif kind == 2:
            c = call(aten.full_like.default, y, 0.5)
        elif kind == 3:
            c = call(aten.new_zeros.default, y, [d])
        elif kind == 4:
            c = call(aten.new_ones.default, y, [t, d])
        elif kind == 5:
            c = call(aten.new_full.default, y, [d], -1.5)
        else:  # uninitialised values: only the shape is used
            e = call(aten.empty_like.default, y) if kind == 6 else call(
                aten.new_empty.default, y, list(y.shape))
            return call(aten.reshape.default, y, list(e.shape))
        return call(aten.add.Tensor, y, c)

    return Case(prog, (t, d))


def case_embedding_of_activation(g):
    """A table lookup whose table is an activation (rows of each sample's own table)."""
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    W = weight(g, d, d, 2.0)
    local_idx = torch.randint(0, t, (ri(g, 1, 4),), generator=g)

    def prog(call, z):
        B = z.shape[0]
        table = call(aten.reshape.default, call(aten.linear.default, z, W), [B * t, d])
        idx = torch.arange(B).unsqueeze(1) * t + local_idx
        return call(aten.embedding.default, table, idx)

    return Case(prog, (t, d))


def case_token_ball(g):
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    rho = float(torch.rand((), generator=g)) * 2 + 0.1
    W = weight(g, d, d, 2.0)

    def prog(call, z):
        return call(torch.ops.lipcert.token_ball.default, call(aten.linear.default, z, W), rho)

    return Case(prog, (t, d), offset=1.5)


def case_group_sort2(g):
    t, d = ri(g, 1, 3), 2 * ri(g, 1, 3)
    W = weight(g, d, d, 2.0)

    def prog(call, z):
        return call(torch.ops.lipcert.group_sort2.default, call(aten.linear.default, z, W))

    return Case(prog, (t, d), offset=0.5)


def case_vector_norm(g):
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    keep = maybe(g)
    W = weight(g, d, d)

    def prog(call, z):
        y = call(aten.linear.default, z, W)
        return call(aten.linalg_vector_norm.default, y, 2, [-1], keep)

    return Case(prog, (t, d))


RULE_CASES = {
    "linear": case_linear,
    "matmul_const": case_matmul_const,
    "matmul_two_activations": case_matmul_two,
    "convolution": case_conv,
    "layer_norm": case_layer_norm,
    "rms_norm": case_rms_norm,
    "batch_norm": case_batch_norm,
    "sdpa": case_sdpa,
    "softmax": case_softmax,
    "arithmetic": case_arith,
    "mean_sum": case_reduce,
    "shape_ops": case_shape,
    "shape_ops_more": case_shape_more,
    "identity": case_identity,
    "sizes": case_sizes,
    "shape_only": case_like,
    "embedding_of_activation": case_embedding_of_activation,
    "pooling": case_pool,
    "token_ball": case_token_ball,
    "group_sort2": case_group_sort2,
    "vector_norm": case_vector_norm,
    **{f"pointwise_{k}": make_pointwise(k) for k in _POINTWISE},
}


@pytest.mark.parametrize("name", list(RULE_CASES))
def test_rule_soundness(name: str) -> None:
    check_rule(RULE_CASES[name], seed=SEED + list(RULE_CASES).index(name),
               record=(__name__, name))


# --------------------------------------------------------------------------- specific checks


def test_gelu_max_slope_is_rounded_up() -> None:
    x = torch.linspace(-6, 6, 2_000_001, dtype=F64, requires_grad=True)
    (gr,) = torch.autograd.grad(torch.nn.functional.gelu(x).sum(), x)
    assert float(gr.max()) <= GELU_MAX_SLOPE <= float(gr.max()) + 1e-9
    assert 1.1289041 < GELU_MAX_SLOPE < 1.1289042


def test_global_slopes() -> None:
    """Over the whole real line the pointwise rules give the known global slopes."""
    ctx = Ctx(1)
    inf = torch.full((1, 3), math.inf, dtype=F64)
    x = input_bound(ctx, BoxDomain(-math.inf, math.inf), (1, 3), box=(-inf, inf))
    call = BoundCall(ctx)
    expect = {"gelu": 1.128904145185155, "silu": 1.099839320128867, "tanh": 1.0,
              "sigmoid": 0.25, "relu": 1.0}
    for name, slope in expect.items():
        out = _POINTWISE[name][0](call, x)
        assert float(out.lip) == pytest.approx(slope, rel=1e-7)
        assert float(out.lip) >= slope - 1e-9


def _mha_prog(wq: Tensor, wk: Tensor, wv: Tensor, wo: Tensor, t: int, h: int) -> Program:
    d = wq.shape[0]
    dh = d // h

    def prog(call, z):
        b = z.shape[0]

        def heads(w):
            y = call(aten.view.default, call(aten.linear.default, z, w), [b, t, h, dh])
            return call(aten.transpose.int, y, 1, 2)

        y = call(aten.scaled_dot_product_attention.default, heads(wq), heads(wk), heads(wv),
                 scale=1.0)
        y = call(aten.reshape.default, call(aten.transpose.int, y, 1, 2), [b, t, d])
        return call(aten.linear.default, y, wo)

    return prog


def test_multihead_attention_forms() -> None:
    """docs/attention.md: the engine certifies several heads with the proven √H form. The paper's
    single form ‖W_O‖‖W_V‖(1 + 2R²‖A‖) (unproven for H > 1) is searched adversarially here:
    orthogonal W_V, W_O, large query scales (near one-hot attention), tokens in the ball of
    radius R = 1, gradient ascent on the max-token Lipschitz ratio. Both must hold."""
    g = torch.Generator().manual_seed(7)
    worst_paper = 0.0
    for trial in range(6):
        h, t = (2, 4, 8)[trial % 3], (2, 3, 4)[trial % 3]
        d = 2 * h
        a = 1.0 + 19.0 * float(torch.rand((), generator=g))
        wq = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0] * a
        wk, wv, wo = (torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
                      for _ in range(3))
        prog = _mha_prog(wq, wk, wv, wo, t, h)
        ctx = Ctx(1)
        x = input_bound(ctx, EmbeddingDomain(1.0), (1, t, d))
        token_ball = torch.ops.lipcert.token_ball.default
        out = prog(BoundCall(ctx), BoundCall(ctx)(token_ball, x, 1.0))
        paper = 1.0 + 2.0 * a  # ‖W_O‖ = ‖W_V‖ = ‖W_K‖ = 1, ‖W_Q‖ = a, R = 1, scale 1
        X = torch.randn(32, t, d, generator=g, dtype=F64)
        Y = X + 0.01 * torch.randn(32, t, d, generator=g, dtype=F64)
        X, Y = X.requires_grad_(True), Y.requires_grad_(True)
        opt = torch.optim.Adam([X, Y], lr=0.03)
        for _ in range(120):
            xb, yb = (token_ball(Z, 1.0) for Z in (X, Y))
            fx, fy = prog(real_call, xb), prog(real_call, yb)
            ratio = (fx - fy).norm(dim=-1).amax(-1) / (xb - yb).norm(dim=-1).amax(-1).clamp_min(
                1e-9)
            opt.zero_grad()
            (-ratio.sum()).backward()
            opt.step()
        best = float(ratio.detach().max())
        assert best <= float(out.lip_tok) * (1 + 1e-9)
        worst_paper = max(worst_paper, best / paper)
    assert worst_paper <= 1.0, f"the paper's multi-head form is violated: {worst_paper}"


def test_attention_mask_mass() -> None:
    """κ₀² = max_j Σ_i softmax(mask)_ij: L/S without a mask, the harmonic number H_L for a
    causal mask (column 0 is seen by every query i with weight 1/(i + 1)), and fully masked
    rows are reported (torch returns zeros there)."""
    assert mask_mass(None, False, 4, 6)[0] == pytest.approx(4 / 6, rel=1e-12)
    mass, dead = mask_mass(None, True, 5, 5)
    assert mass == pytest.approx(sum(1 / (i + 1) for i in range(5)), rel=1e-12) and dead is None
    m = torch.ones(3, 3, dtype=torch.bool)
    m[1] = False
    mass, dead = mask_mass(Const(m), False, 3, 3)
    assert mass == pytest.approx(2 / 3, rel=1e-12) and dead.tolist() == [False, True, False]
    with pytest.raises(UnsupportedOpError, match="NaN"):
        mask_mass(Const(torch.full((3, 3), math.nan)), False, 3, 3)


def test_unsupported_op_message() -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return torch.cumsum(self.lin(x), dim=-1)

    from lipcert.bounds import Propagator

    prop = Propagator.from_model(Odd(), torch.rand(2, 3))
    with pytest.raises(UnsupportedOpError) as err:
        prop.run((0.0, 1.0), sample_shape=(3,))
    msg = str(err.value)
    assert "aten.cumsum" in msg
    assert "@lipcert.bounds.rule(torch.ops.aten.cumsum)" in msg
    assert "lipcert/bounds/rules/arithmetic.py" in msg
    assert "graph node 'cumsum'" in msg


def test_unsupported_message_names_module() -> None:
    class Inner(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.special.erfinv(x * 0.5)

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Inner()

        def forward(self, x: Tensor) -> Tensor:
            return self.block(x)

    from lipcert.bounds import Propagator

    prop = Propagator.from_model(Outer(), torch.rand(2, 3))
    with pytest.raises(UnsupportedOpError, match=r"module 'block' \(.*Inner\)"):
        prop.run((0.0, 1.0), sample_shape=(3,))


def test_batch_mixing_raises() -> None:
    ctx = Ctx(2)
    box = torch.ones(2, 3, dtype=F64)
    x = input_bound(ctx, BoxDomain(-1, 1), (2, 3), box=(-box, box))
    call = BoundCall(ctx)
    with pytest.raises(BatchMixingError):
        call(aten.mean.dim, x, [0])
    with pytest.raises(BatchMixingError):
        call(aten.linear.default, call(aten.t.default, x), torch.ones(2, 2, dtype=F64))
    with pytest.raises(BatchMixingError):
        call(aten.batch_norm.default, x, None, None, None, None, True, 0.1, 1e-5, False)
    # moving the batch around without mixing it is fine
    y = call(aten.t.default, x)
    z = call(aten.t.default, y)
    out = call(aten.linear.default, z, torch.eye(3, dtype=F64))
    assert out.lip.shape == (2,)


def test_per_sample_bounds_with_batch_merged_into_heads() -> None:
    """nn.MultiheadAttention merges the batch with the heads (view [T, B·H, dh]); bounds stay
    per sample and match a one-sample run."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
    model = torch.nn.Sequential(layer).eval()
    from lipcert.bounds import Propagator

    prop = Propagator.from_model(model, torch.rand(2, 3, 8))
    x = torch.rand(3, 3, 8)
    r = torch.tensor([0.01, 0.02, 0.05], dtype=F64)
    res = prop.run((0.0, 1.0), center=x, radius=r)
    for i in range(3):
        one = prop.run((0.0, 1.0), center=x[i : i + 1], radius=r[i : i + 1])
        assert torch.allclose(res.output.lip[i], one.output.lip[0], rtol=1e-9)


def test_embedding_of_the_certified_input_is_refused() -> None:
    ctx = Ctx(1)
    box = torch.ones(1, 3, dtype=F64)
    x = input_bound(ctx, BoxDomain(0, 5), (1, 3), box=(0 * box, 4 * box))
    with pytest.raises(UnsupportedOpError, match="embedding space"):
        BoundCall(ctx)(aten.embedding.default, torch.randn(6, 2, dtype=F64), x)
