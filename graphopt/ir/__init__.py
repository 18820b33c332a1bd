"""The IR layer: ONNX through onnx-graphsurgeon. Imports nothing else of graphopt."""
