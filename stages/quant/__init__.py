"""Weights to integer codes (the encode path): the quantization grid, RTN and GPTQ, LQER corrections,
calibration Hessians, and bit allocation to a byte budget. Decoding lives in pgolf.formats.dequant."""
