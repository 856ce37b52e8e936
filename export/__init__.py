"""Deployment export of car_tf runs: serving SavedModel, ONNX, and their parity checks.

Run ``python -m export --model_dir=RUN --format=saved_model|onnx|both``. Modules: saved_model
(float32 copy, serving signature), onnx_export (tf2onnx + parity), parity (comparisons and the
images they use), serve_onnx (onnxruntime + PIL classifier that never imports TensorFlow).
This package imports nothing heavy itself, so ``python -m export.serve_onnx`` stays TensorFlow-free.
"""
