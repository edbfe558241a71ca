"""Fused LoRA projections (issue 28): fewer, larger GEMMs per LoRA layer, exactly the same function.

Unsloth's LoRA path runs, per projection, a dequantize, the base GEMM ``X @ W.T``, a thin GEMM
``X @ A.T`` (rank 16: it re-reads the whole input for 16 output columns) and an ``addmm`` with ``B``;
its backward recomputes ``X @ A.T``, reads the input again for each ``A``'s gradient and accumulates
the input-gradient projection by projection. For the Qwen2 family (biases on q, k and v) Unsloth does
not fuse q/k/v at all: PEFT's three separate LoRA layers run. Here, for a group of projections that
read the same input (q/k/v; gate/up; o; down):

- forward, one GEMM: the input times the stack ``[W_1; ...; W_n; A_1; ...; A_n]`` (each 4-bit base
  weight dequantized into its rows of one buffer, the LoRA ``A`` rows appended, the biases in the
  GEMM's epilogue). The ``X @ A.T`` columns come out with the base outputs and are kept for the
  backward (``rank`` columns per projection: small), so nothing recomputes them;
- each output = its base columns + scale x (its ``X @ A.T`` columns) @ ``B.T`` (one ``addmm``);
- backward: ``dB`` from the saved ``X @ A.T`` columns; the ``A`` gradients of the whole group in one
  GEMM over the input (one read instead of one per projection); the input-gradient as the output
  gradients (and their LoRA parts) against the same stack: one GEMM where concatenating the output
  gradients is cheaper than accumulating into the input-gradient once per projection (q/k/v, o,
  down), else one GEMM per base weight and one for all the LoRA parts (gate/up, whose outputs are
  wider than its input).

Exact: no term is dropped or approximated (the merged ``W + s B A`` shortcut is not used); only the
order of floating-point additions differs from PEFT's (base + LoRA, per projection), so bf16 results
differ from the unfused path by rounding. tests/test_fused_lora.py compares forward and every gradient
with PEFT's own layers on the tiny model (NF4 base, float32 compute); on a GPU, tests/test_gpu.py
compares a training step of an Unsloth model with and without it.

Why hand-written: neither Unsloth (fast_lora.py runs one GEMM per projection) nor PEFT nor Liger
has a LoRA layer that folds ``A`` into the base GEMM or groups projections; this is 4 GEMM calls
around torch's cuBLAS, no new kernel. The SwiGLU between gate/up and down is Unsloth's Triton
kernel pair where it is importable (CUDA), else the same arithmetic in torch.

Where it plugs in: Unsloth's attention calls ``self.apply_qkv(self, X)`` and ``self.apply_o(self, X)``
and its MLP's ``forward`` is replaceable; ``install`` sets those on every decoder layer whose
projections are plain LoRA (one active adapter, no dropout, no LoRA bias, frozen base). Other
layers keep what they had.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch


@dataclass
class Group:
    """The frozen parts of projections that read one input: base weights (a bitsandbytes 4-bit
    parameter or a plain tensor), base biases, LoRA scales; the trainable ``A``/``B`` pass through autograd."""

    weights: list
    biases: list
    scales: list[float]
    out_features: list[int] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    cat_input_grad: bool = True  # the input-gradient as one GEMM over concatenated output gradients

    @property
    def width(self) -> int:
        return sum(self.out_features)


def _dequantize_into(weight, out: torch.Tensor) -> None:
    state = getattr(weight, "quant_state", None)
    if state is None:
        out.copy_(weight)
        return
    import bitsandbytes.functional as bnbf

    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a CPU layer's weight for its own inference kernel (eval mode, no grad):
        # back to the standard layout, into a copy, for dequantize_4bit
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), state)
        out.copy_(bnbf.dequantize_4bit(data, state))
        return
    if out.is_cuda and state.dtype == out.dtype:
        bnbf.dequantize_4bit(weight, state, out=out)  # straight into its rows of the stack
    else:  # bitsandbytes has no out= form on a CPU
        out.copy_(bnbf.dequantize_4bit(weight, state))


def stack(group: Group, As, dtype, device) -> torch.Tensor:
    """``[W_1; ...; W_n; A_1; ...; A_n]``, [sum out + sum rank, in], in the compute dtype."""
    d = As[0].shape[1]
    W = torch.empty(group.width + sum(group.ranks), d, dtype=dtype, device=device)
    row = 0
    for w, n in zip(group.weights, group.out_features):
        _dequantize_into(w, W[row : row + n])
        row += n
    for a in As:
        W[row : row + a.shape[0]].copy_(a)
        row += a.shape[0]
    return W


def _bias(group: Group, dtype, device) -> torch.Tensor | None:
    if all(b is None for b in group.biases):
        return None
    parts = [
        torch.zeros(n, dtype=dtype, device=device) if b is None else b.to(dtype)
        for b, n in zip(group.biases, group.out_features)
    ]
    return torch.cat([*parts, torch.zeros(sum(group.ranks), dtype=dtype, device=device)])


def group_forward(X2: torch.Tensor, group: Group, As, Bs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(each projection's output [M, out_i], the ``X @ A.T`` columns [M, sum rank]) in one GEMM + one addmm each."""
    dtype = X2.dtype
    W = stack(group, As, dtype, X2.device)
    bias = _bias(group, dtype, X2.device)
    Y = X2 @ W.t() if bias is None else torch.addmm(bias, X2, W.t())
    del W
    N = group.width
    XA = Y[:, N:]
    outs, col, rcol = [], 0, 0
    for n, r, B, s in zip(group.out_features, group.ranks, Bs, group.scales):
        outs.append(torch.addmm(Y[:, col : col + n], XA[:, rcol : rcol + r], B.to(dtype).t(), alpha=s))
        col, rcol = col + n, rcol + r
    return outs, XA.contiguous()


def group_backward(X2, XA, douts, group: Group, As, Bs):
    """(dX [M, in], [dA_i], [dB_i]) for ``group_forward``'s outputs' gradients ``douts``."""
    dtype = X2.dtype
    dXA_parts, dBs, rcol = [], [], 0
    for dY, r, B, s in zip(douts, group.ranks, Bs, group.scales):
        dXA_parts.append(dY @ B.to(dtype).mul(s))  # [M, r]: the gradient of X @ A.T, scale included
        dBs.append((dY.t() @ XA[:, rcol : rcol + r]).mul_(s))  # [out, r]
        rcol += r
    dXA = torch.cat(dXA_parts, dim=1)
    dA_all = dXA.t() @ X2  # every A's gradient, one read of the input
    dAs, row = [], 0
    for r in group.ranks:
        dAs.append(dA_all[row : row + r])
        row += r
    W = stack(group, As, dtype, X2.device)
    N = group.width
    if group.cat_input_grad:
        dX = torch.cat([*douts, dXA], dim=1) @ W
    else:
        dX, row = None, 0
        for dY, n in zip(douts, group.out_features):
            dX = dY @ W[row : row + n] if dX is None else dX.addmm_(dY, W[row : row + n])
            row += n
        dX.addmm_(dXA, W[N:])
    return dX, dAs, dBs


def _flat(X):
    return X.reshape(-1, X.shape[-1])


class FusedLoRAGroup(torch.autograd.Function):
    """Projections sharing one input, LoRA included: ``apply(X, group, A_1, B_1, ..., A_n, B_n)``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, X, group: Group, *AB):
        As, Bs = AB[0::2], AB[1::2]
        X2 = _flat(X)
        outs, XA = group_forward(X2, group, [a.to(X2.dtype) for a in As], Bs)
        ctx.group, ctx.shape = group, X.shape
        ctx.save_for_backward(X, XA, *AB)
        return tuple(o.view(*X.shape[:-1], o.shape[-1]) for o in outs)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *douts):
        X, XA, *AB = ctx.saved_tensors
        As, Bs = AB[0::2], AB[1::2]
        X2 = _flat(X)
        dX, dAs, dBs = group_backward(
            X2, XA, [_flat(d).to(X2.dtype) for d in douts], ctx.group, [a.to(X2.dtype) for a in As], Bs
        )
        grads = [g for pair in zip(dAs, dBs) for g in pair]
        grads = [g.to(p.dtype) for g, p in zip(grads, AB)]
        return (dX.view(ctx.shape), None, *grads)


def _swiglu_torch(e, g):
    return torch.nn.functional.silu(e) * g


def _swiglu_backward_torch(dh, e, g):
    """(h, dg, de) as Unsloth's kernel returns them: h recomputed, the gradients of g and of e."""
    ef = e.float()
    se = torch.sigmoid(ef)
    f = (ef * se).to(e.dtype)
    h = f * g
    dg = dh * f
    de = ((dh * g).float() * se * (1.0 + ef * (1.0 - se))).to(e.dtype)
    return h, dg, de


def swiglu_kernels(device: torch.device):
    """(forward, backward, name): Unsloth's Triton SwiGLU kernels on CUDA where importable, else torch's."""
    if device.type == "cuda":
        try:
            from unsloth.kernels.swiglu import swiglu_DWf_DW_dfg_kernel, swiglu_fg_kernel

            def backward(dh, e, g):
                h, dg, de = swiglu_DWf_DW_dfg_kernel(dh, e, g)  # in place: (h, df, de) in (dh, e, g)
                return h, dg, de

            return swiglu_fg_kernel, backward, "unsloth"
        except ImportError:
            pass
    return _swiglu_torch, _swiglu_backward_torch, "torch"


class FusedLoRAMLP(torch.autograd.Function):
    """``down(silu(gate(X)) * up(X))`` with LoRA on all three: gate/up as one group (one GEMM), down as
    one GEMM with its ``A`` folded in. Saves X, the gate and up outputs and the thin ``X @ A.T`` columns;
    the SwiGLU output is recomputed in the backward (as Unsloth's LoRA_MLP does)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, X, gu: Group, down: Group, *ab):
        gA, gB, uA, uB, dA, dB = ab  # gate's, up's and down's LoRA A and B
        X2 = _flat(X)
        dtype = X2.dtype
        fwd, bwd, _ = swiglu_kernels(X2.device)
        (e, g), XA = group_forward(X2, gu, [gA.to(dtype), uA.to(dtype)], [gB, uB])
        h = fwd(e.view(1, *e.shape), g.view(1, *g.shape)).view(e.shape)
        (out,), hA = group_forward(h, down, [dA.to(dtype)], [dB])
        del h
        ctx.gu, ctx.down, ctx.bwd, ctx.shape = gu, down, bwd, X.shape
        ctx.save_for_backward(X, e, g, XA, hA, gA, gB, uA, uB, dA, dB)
        return out.view(*X.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        X, e, g, XA, hA, gA, gB, uA, uB, dA, dB = ctx.saved_tensors
        X2 = _flat(X)
        dtype = X2.dtype
        dY = _flat(dout).to(dtype)
        # down: its input-gradient needs no h; its A-gradient does, recomputed with the SwiGLU's backward
        dXA_d = dY @ dB.to(dtype).mul(ctx.down.scales[0])
        d_dB = (dY.t() @ hA).mul_(ctx.down.scales[0])
        Wd = stack(ctx.down, [dA.to(dtype)], dtype, X2.device)
        dh = torch.cat([dY, dXA_d], dim=1) @ Wd
        del Wd
        h, dg, de = ctx.bwd(dh, e, g)
        d_dA = dXA_d.t() @ h
        del h
        dX, (d_gA, d_uA), (d_gB, d_uB) = group_backward(
            X2, XA, [de, dg], ctx.gu, [gA.to(dtype), uA.to(dtype)], [gB, uB]
        )
        grads = [d_gA, d_gB, d_uA, d_uB, d_dA, d_dB]
        grads = [gr.to(p.dtype) for gr, p in zip(grads, (gA, gB, uA, uB, dA, dB))]
        return (dX.view(ctx.shape), None, None, *grads)


# ---- PEFT layers -> groups ---------------------------------------------------------------------------


def plain_lora(proj) -> str | None:
    """The adapter's name when ``proj`` is a PEFT LoRA layer these functions compute exactly (one active
    adapter, enabled, unmerged, no dropout, no LoRA bias, no variant such as DoRA, frozen base weight);
    else None."""
    lora_A = getattr(proj, "lora_A", None)
    if lora_A is None or getattr(proj, "disable_adapters", True) or getattr(proj, "merged", False):
        return None
    active = proj.active_adapters
    if len(active) != 1 or active[0] not in lora_A:
        return None
    name = active[0]
    if not isinstance(proj.lora_dropout[name], torch.nn.Identity):
        return None
    if proj.lora_B[name].bias is not None or name in getattr(proj, "lora_magnitude_vector", {}):
        return None
    if (getattr(proj, "lora_variant", None) or {}).get(name) is not None:
        return None
    if proj.get_base_layer().weight.requires_grad:
        return None
    return name


def group_of(projs, cat_input_grad: bool = True) -> tuple[Group, list[torch.Tensor]]:
    """(the frozen Group, [A_1, B_1, ...]) of PEFT LoRA layers that ``plain_lora`` accepts."""
    weights, biases, scales, outs, ranks, ab = [], [], [], [], [], []
    for p in projs:
        name = plain_lora(p)
        base = p.get_base_layer()
        weights.append(base.weight)
        biases.append(base.bias)
        scales.append(float(p.scaling[name]))
        outs.append(base.out_features)
        ranks.append(p.r[name])
        ab += [p.lora_A[name].weight, p.lora_B[name].weight]
    return Group(weights, biases, scales, outs, ranks, cat_input_grad), ab


def fused_projections(projs, X, cat_input_grad: bool = True) -> tuple[torch.Tensor, ...]:
    group, ab = group_of(projs, cat_input_grad)
    return FusedLoRAGroup.apply(X, group, *ab)


def fused_mlp(mlp, X) -> torch.Tensor:
    gu, (gA, gB, uA, uB) = group_of([mlp.gate_proj, mlp.up_proj], cat_input_grad=False)
    down, (dA, dB) = group_of([mlp.down_proj])
    return FusedLoRAMLP.apply(X, gu, down, gA, gB, uA, uB, dA, dB)


# ---- installing on an Unsloth model ----------------------------------------------------------------------


def _apply_qkv(self, X):
    return fused_projections((self.q_proj, self.k_proj, self.v_proj), X)


def _apply_o(self, X):
    return fused_projections((self.o_proj,), X)[0]


def _mlp_forward(self, X):
    return fused_mlp(self, X)


def decoder_layers(model):
    """The decoder layers of a PEFT-wrapped causal LM (Llama/Qwen2/Mistral layout), or []."""
    inner = model
    for attr in ("base_model", "model", "model"):
        inner = getattr(inner, attr, inner)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def _silu_mlp(mlp) -> bool:
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, torch.nn.SiLU) or getattr(getattr(mlp, "config", None), "hidden_act", "") == "silu"


def _unsloth_attention(attn) -> bool:
    """Unsloth's attention forward (it calls ``getattr(self, "apply_qkv", original_apply_qkv)``; for
    Qwen2's biased q/k/v it sets no ``apply_qkv`` attribute and PEFT's layers run)."""
    return getattr(type(attn).forward, "__module__", "").startswith("unsloth")


def install(model) -> dict:
    """Put the fused functions where Unsloth's decoder layers call their projections; returns what was
    fused (counts per kind, and layers left as they were with why)."""
    done = {"qkv": 0, "o": 0, "mlp": 0, "layers": 0, "left": []}
    for i, layer in enumerate(decoder_layers(model)):
        done["layers"] += 1
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        hooked = attn is not None and (hasattr(attn, "apply_qkv") or _unsloth_attention(attn))
        if attn is not None and all(plain_lora(getattr(attn, n, None)) for n in ("q_proj", "k_proj", "v_proj")):
            if not hooked:
                done["left"].append(f"layer {i}: attention has no apply_qkv hook (not an Unsloth model)")
            else:
                attn.apply_qkv = _apply_qkv
                done["qkv"] += 1
        if hooked and plain_lora(getattr(attn, "o_proj", None)):
            attn.apply_o = _apply_o
            done["o"] += 1
        if mlp is not None and all(plain_lora(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj")):
            if _silu_mlp(mlp):
                mlp.forward = types.MethodType(_mlp_forward, mlp)
                done["mlp"] += 1
            else:
                done["left"].append(f"layer {i}: MLP activation is not SiLU")
    return done
