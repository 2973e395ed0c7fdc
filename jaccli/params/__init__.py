"""Derivatives w.r.t. the parameters: per-sample Jacobians, products, objectives, Hessians."""
