"""Running `cuda` packages: onnxruntime's CUDA execution provider with IOBinding and CUDA graphs.

NOT YET RUN ON A GPU. The binding logic (buffers per shape, uploads skipped for unchanged inputs,
output buffers learnt on the first run) is tested on the CPU execution provider, where
IOBinding works the same way; what only a GPU can show (CUDA graph capture and replay, the
provider options, the timings) is what `benchmarks/gpu_check.py` runs.
"""
