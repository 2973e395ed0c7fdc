"""Per-layer rules. Importing this package registers every rule."""

from . import elementwise, linear, normalization, pooling, shape  # noqa: F401  (registration)
from .base import Rule, register, registered_classes, rule_for

__all__ = ["Rule", "register", "registered_classes", "rule_for"]
