"""Jacobian engine: the generic torch.func path and per-batch computation."""

from .generic import MODES, choose_mode, per_sample_frobenius, per_sample_jacobian

__all__ = ["MODES", "choose_mode", "per_sample_frobenius", "per_sample_jacobian"]
