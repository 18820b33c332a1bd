"""Quantization: calibration (calibrate.py), QDQ insertion (insert_qdq.py, the `quantize` pass) and
fake-quant folding (fold_qdq.py)."""
