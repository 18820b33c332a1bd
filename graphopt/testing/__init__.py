"""Test support: synthetic ONNX model builders with random weights."""
