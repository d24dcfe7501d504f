"""Pure quantization maths on tensors: formats, packing, RTN, GPTQ. No file I/O."""

from inferkit.quant.scheme import QuantFormat, parse_format

__all__ = ["QuantFormat", "parse_format"]
