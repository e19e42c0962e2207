"""Serving a trained model directory: preprocessing, ONNX export, TensorRT engines and inference backends."""
