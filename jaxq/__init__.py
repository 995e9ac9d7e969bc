"""jaxq: quantized training, PTQ/int8 serving and activation-compressed training for JAX."""

from jaxq.spec import QuantSpec, Rule

__version__ = "0.1.0"
