"""Target-free ONNX graph rewrites. Never imports codegen."""
