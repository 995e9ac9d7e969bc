"""Pallas GPU kernels for jaxq (Triton backend), each with a pure-jnp reference beside it.

Every kernel takes ``interpret=`` to run its body with the Pallas interpreter on the CPU.
Users reach them through :mod:`jaxq.kernels`, which dispatches Pallas on GPU and the XLA
references elsewhere.
"""

from pallas_kernels._common import TINY, VALID_BITS, epilogue
from pallas_kernels.int4_matmul import int4_matmul, int4_matmul_ref, pack_int4, unpack_int4
from pallas_kernels.int4_matmul_grouped import int4_matmul_grouped, int4_matmul_grouped_ref
from pallas_kernels.int8_matmul import int8_matmul, int8_matmul_ref
from pallas_kernels.int8_matmul_dynamic import (
    int8_matmul_dynamic, int8_matmul_dynamic_ref, quantize_rows_ref)
from pallas_kernels.quantize_pack import pack_ref, quantize_pack, quantize_pack_ref
from pallas_kernels.unpack_dequantize import unpack_dequantize, unpack_dequantize_ref, unpack_ref

__all__ = [
    "TINY", "VALID_BITS", "epilogue",
    "quantize_pack", "quantize_pack_ref", "pack_ref",
    "unpack_dequantize", "unpack_dequantize_ref", "unpack_ref",
    "int8_matmul", "int8_matmul_ref",
    "int8_matmul_dynamic", "int8_matmul_dynamic_ref", "quantize_rows_ref",
    "int4_matmul", "int4_matmul_ref", "pack_int4", "unpack_int4",
    "int4_matmul_grouped", "int4_matmul_grouped_ref",
]
