"""Engine workers: model packages served over gRPC (KServe v2 Open Inference Protocol).

Importing this package loads nothing: the client side (engine.client) uses the wire modules here
without onnxruntime, and only engine.worker.scheduler / server / main touch the engine.
"""
