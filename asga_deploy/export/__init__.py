"""Deployment: exact ONNX QDQ lowering, ONNX Runtime parity and latency, TensorRT engines, static checks.

Modules import onnx / onnxruntime / tensorrt lazily; `asga_deploy.export.run.run_export` is the entry point.
"""
