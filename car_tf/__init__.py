"""car_tf: long-tailed image recognition in TensorFlow / Keras."""
