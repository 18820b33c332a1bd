"""Post-training quantization: calibration (calibrate.py) and QDQ insertion (insert_qdq.py)."""
