"""tensorwire: an inference server, its client SDK, trainer and load tests.

The subpackages are independent parts joined by one wire contract
(:mod:`tensorwire.proto`); see ARCHITECTURE.md for who may import whom.
"""

__version__ = "0.1.0"
