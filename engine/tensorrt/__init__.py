"""Running `tensorrt` packages: TensorRT engines per resolution, driven with CuPy device buffers.

NOT YET RUN ON A GPU: TensorRT cannot be installed on the GPU machines this project can reach.
Tested without a GPU: the profile and shape arithmetic (`profiles`), the engine cache keys,
manifest section, mismatch and size refusals (`cache`), the errors when `tensorrt`, CuPy or a
GPU is missing, and LoRAs by refit (`refit`: which weights a switch between variants writes,
and the refusals) against a fake `tensorrt`. The engine building (export/tensorrt_engines.py),
`runtime` and the refit calls are written against the TensorRT 10 Python API and have never
executed.
"""
