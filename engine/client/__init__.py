"""Client side of the engine workers: importable without onnxruntime or torch (the front end uses it)."""
