"""Kiln's engine: runs model packages with onnxruntime and numpy. Never imports torch."""
