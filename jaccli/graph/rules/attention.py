"""`scaled_dot_product_attention(q, k, v)`: out_t = Σ_s P_ts v_s, P = softmax(scale q kᵀ + mask).

Per head, with o = out:
    ∂o/∂v = P ⊗ I                                   (Kronecker, one group per head)
    ∂o_t/∂q_t = scale Vᵀ (diag(p_t) - p_t p_tᵀ) K     (one dv×d block per query: block diagonal)
    ∂o_t/∂k_s = scale P_ts (v_s - o_t) q_tᵀ          (a dense (T dv)×(S d) block per head)
JVPs and VJPs apply these blocks (forward-mode AD through the fused CPU kernel is not
available in every torch build).
"""

from __future__ import annotations

import math

import torch

from ..opgraph import BATCHED
from ..replay import OpCall
from ..structures import Kronecker
from .registry import OpRule, leaf_node, register

aten = torch.ops.aten


@register(aten.scaled_dot_product_attention.default)
class AttentionRule(OpRule):
    name = "attention"
    family = "attention"

    def _options(self, node):
        names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        defaults = (None, 0.0, False, None, False)
        values = {}
        for i, (name, default) in enumerate(zip(names, defaults, strict=True)):
            values[name] = node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(
                name, default)
        return values

    def applies(self, node, graph, position):
        options = self._options(node)
        if position not in (0, 1, 2) or options["dropout_p"] or options["enable_gqa"]:
            return False
        operands = [leaf_node(node, graph, i) for i in range(3)]
        if any(o is None or o.shape is None or len(o.shape) < 2 for o in operands):
            return False
        if any(o.kind in BATCHED and o.batch_axis != 0 for o in operands):
            return False
        q, k, v = (o.shape for o in operands)
        return (node.batch_axis == 0 and q[:-2] == k[:-2] == v[:-2]
                and all(o.kind in BATCHED for o in operands))

    def structure(self, node, graph, position):
        return "kronecker"

    def _parts(self, call: OpCall):
        """q, k, v `(B, H, T|S, d)`, P `(B, H, T, S)`, out `(B, H, T, dv)`, scale; H: all
        leading per-sample axes flattened."""
        options = self._options(call.node)
        dtype = call.output.dtype
        args, kwargs = call.arguments()
        q, k, v = (args[i].to(dtype) for i in range(3))
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        scale = options["scale"] or 1.0 / math.sqrt(q.shape[-1])
        scores = scale * (q @ k.transpose(-1, -2))
        if options["is_causal"]:
            t, s = scores.shape[-2:]
            causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if mask is not None:
            scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                      else scores + mask.to(dtype))
        p = torch.softmax(scores, dim=-1)
        out = p @ v
        flat = [t.reshape(call.batch, -1, *t.shape[-2:]) for t in (q, k, v, p, out)]
        return (*flat, scale)

    def jacobian(self, call, position):
        q, k, v, p, out, scale = self._parts(call)
        b, h, t, d = q.shape
        s, dv = v.shape[-2:]
        if position == 2:
            return Kronecker(p, None, h, right_size=dv)
        if position == 0:
            jac_softmax = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]  # (b,h,t,s,s)
            block = scale * v.transpose(-1, -2)[:, :, None] @ jac_softmax @ k[:, :, None]
            return Kronecker(None, block.reshape(b, h * t, dv, d), h * t)
        # (t, s) block: scale p_ts (v_s - o_t) q_tᵀ, laid out as ((t, a), (s, c))
        diff = v[:, :, None, :, :] - out[:, :, :, None, :]  # (b, h, t, s, dv)
        block = scale * p[..., None, None] * diff[..., :, None] * q[:, :, :, None, None, :]
        block = block.permute(0, 1, 2, 4, 3, 5).reshape(b, h, t * dv, s * d)
        return Kronecker(None, block, h)

    def jvp(self, call, position, v):
        j = self.jacobian(call, position)
        flat = v.reshape(v.shape[0], v.shape[1], -1).transpose(1, 2)
        return j.right_apply(flat).transpose(1, 2).reshape(*v.shape[:2], *call.out_shape)

    def vjp(self, call, position, u):
        j = self.jacobian(call, position)
        flat = u.reshape(u.shape[0], u.shape[1], -1)
        return j.left_apply(flat).reshape(*u.shape[:2], *call.in_shape(position))
