"""numba kernels used by passes: histograms and clipping-threshold searches for calibration."""
