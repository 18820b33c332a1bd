"""Low-rank factorization: SVD for Gemm and MatMul, Tucker-2 for Conv, ranks chosen by option,
by VBMF, or by a sensitivity-driven budget."""
