"""The HTTP front end: OpenAI-compatible routes over the engine worker pool (no onnxruntime here)."""
