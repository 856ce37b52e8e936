"""Per-class evaluation: metrics, the report and its plots, predictors for every model form
(Keras, SavedModel, ONNX), the per-epoch callback, and ``evaluate`` as a library."""
