"""Example entities shipped with keyq: counter, journal, cart and device."""

from keyq.examples.cart import Cart
from keyq.examples.counter import Counter
from keyq.examples.device import Device
from keyq.examples.journal import Journal

__all__ = ["Cart", "Counter", "Device", "Journal"]
