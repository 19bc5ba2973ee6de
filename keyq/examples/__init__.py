"""Example entities shipped with keyq: counter, journal and cart."""

from keyq.examples.cart import Cart
from keyq.examples.counter import Counter
from keyq.examples.journal import Journal

__all__ = ["Cart", "Counter", "Journal"]
