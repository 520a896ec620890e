#!/usr/bin/env bash
# The GPU check's two halves: what to bring (here, with a package registry) and the run (there,
# on the offline GPU machine; see ../shared/GPU.md). The Python side is benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh prepare        # here: .ortgpu/part-K (onnxruntime-gpu) and .whl/
#   then, with the device tool, back to back (the parts live in /tmp of that machine only):
#     run(command="mkdir -p /tmp/ortw && cp .ortgpu/part-K/* /tmp/ortw/", carry=[".ortgpu/part-K"])   for K = 1..N
#     run(command="bash benchmarks/gpu_check.sh remote", carry=[".whl"], timeout_s=600)
#   `remote` installs everything into /tmp/site and runs the check with its results in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

# Wheels the GPU machine lacks (its image has torch, numpy, onnx, tokenizers 0.23, transformers 5,
# huggingface_hub 1.x, safetensors, sympy, pillow, matplotlib, CuPy): the versions Kiln is tested
# with, since transformers 4.57 refuses tokenizers 0.23 and huggingface_hub 1.x.
WHEELS=(
  diffusers==0.39.0
  transformers==4.57.6
  tokenizers==0.22.2
  huggingface-hub==0.36.2
  optimum==2.1.0
  optimum-onnx==0.1.0
  msgspec==0.22.0
)

prepare() {
  ../shared/tools/ort-gpu-parts "${ORT_GPU_VERSION:-1.31.1}"
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  rm -rf .whl && mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${WHEELS[@]}"
  du -sh .whl .ortgpu/part-*
  local parts; parts=$(ls -d .ortgpu/part-* | wc -l)
  echo "now, with the device tool, back to back:"
  for k in $(seq 1 "$parts"); do
    echo "  run(command=\"mkdir -p /tmp/ortw && cp .ortgpu/part-$k/* /tmp/ortw/\", carry=[\".ortgpu/part-$k\"])"
  done
  echo "  run(command=\"bash benchmarks/gpu_check.sh remote\", carry=[\".whl\"], timeout_s=600)"
}

remote() {
  export PYTHONUNBUFFERED=1
  local name; name=$(cat /tmp/ortw/NAME)
  cat /tmp/ortw/*.part.* > "/tmp/ortw/$name"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "/tmp/ortw/$name" .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || true
  local out=${OUT:-build/gpu-check/out}
  mkdir -p "$out"
  # 540 s leaves the run's last minute for the table and the copy back; the budget skips the
  # optional measurements (session.run, large sizes) before that.
  timeout 570 python3 -m benchmarks.gpu_check --out "$out" --budget-s "${BUDGET_S:-480}" "$@"
}

case "${1:-}" in
  prepare) prepare ;;
  remote) shift; remote "$@" ;;
  *) echo "usage: bash benchmarks/gpu_check.sh prepare | remote [gpu_check.py options]" >&2; exit 2 ;;
esac
