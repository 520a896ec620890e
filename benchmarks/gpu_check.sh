#!/usr/bin/env bash
# The GPU check's steps around benchmarks/gpu_check.py: what to bring (here, where a package
# registry answers) and the run (there, on the offline GPU machine; see ../shared/GPU.md).
#
# Here:   bash benchmarks/gpu_check.sh prepare
#         -> .ortgpu/part-1..N (onnxruntime-gpu, split to fit a transfer) and .whl/ (Kiln's other needs)
# There, with the device tool, back to back (/tmp of that machine holds everything between calls):
#   run(command="bash benchmarks/gpu_check.sh start", carry=[".whl"])
#       installs .whl into /tmp/site and starts the SD 1.5 export and the cpu fp32 reference image
#       in the background (CPU work, about 4-5 minutes) while the onnxruntime-gpu parts travel
#   run(command="bash benchmarks/gpu_check.sh part K", carry=[".ortgpu/part-K"])      for K = 1..N
#   run(command="bash benchmarks/gpu_check.sh remote", timeout_s=600)
#       installs onnxruntime-gpu, waits for the export, runs the check; results in $OUT
set -euo pipefail
cd "$(dirname "$0")/.."

# The GPU machines' image has torch, numpy, onnx, CuPy, sympy, pillow, matplotlib, safetensors,
# but transformers 5, tokenizers 0.23 and huggingface_hub 1.x, which transformers 4.57 refuses;
# these are the versions Kiln is tested with.
WHEELS=(
  diffusers==0.39.0
  transformers==4.57.6
  tokenizers==0.22.2
  huggingface-hub==0.36.2
  optimum==2.1.0
  optimum-onnx==0.1.0
  msgspec==0.22.0
)
SITE=/tmp/site
WORK=/tmp/kiln-gpu-check   # checkpoint and packages: outside the copied working tree
EXPORT_LOG=/tmp/kiln-export.log
EXPORT_DONE=/tmp/kiln-export.rc

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
  echo "  run(command=\"bash benchmarks/gpu_check.sh start\", carry=[\".whl\"])"
  for k in $(seq 1 "$parts"); do
    echo "  run(command=\"bash benchmarks/gpu_check.sh part $k\", carry=[\".ortgpu/part-$k\"])"
  done
  echo "  run(command=\"bash benchmarks/gpu_check.sh remote\", timeout_s=600)"
}

start() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  rm -f "$EXPORT_DONE"
  # Its own copy of the code: the next calls refresh the working tree under a running process.
  rm -rf /tmp/kiln-src && mkdir -p /tmp/kiln-src
  tar --exclude=./.whl --exclude=./.ortgpu --exclude=./build -cf - . | tar -C /tmp/kiln-src -xf -
  # A new process session outlives this call (the machine stays up while calls follow each other).
  setsid nohup bash -c "cd /tmp/kiln-src && export PYTHONPATH=$SITE PYTHONUNBUFFERED=1; \
    python3 -m benchmarks.gpu_check --export-only --work $WORK; echo \$? > $EXPORT_DONE" \
    > "$EXPORT_LOG" 2>&1 < /dev/null &
  sleep 20
  tail -n 5 "$EXPORT_LOG"
}

part() {
  mkdir -p /tmp/ortw && cp ".ortgpu/part-$1/"* /tmp/ortw/
  ls -la /tmp/ortw
  tail -n 2 "$EXPORT_LOG" 2>/dev/null || true
}

remote() {
  export PYTHONUNBUFFERED=1
  local name; name=$(cat /tmp/ortw/NAME)
  cat /tmp/ortw/*.part.* > "/tmp/ortw/$name"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "/tmp/ortw/$name"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || true
  local out=${OUT:-build/gpu-check/out}
  mkdir -p "$out"
  if [[ -f $EXPORT_LOG ]]; then   # `start` ran: wait for its export rather than race it
    for _ in $(seq 1 60); do [[ -f $EXPORT_DONE ]] && break; sleep 5; done
    cp "$EXPORT_LOG" "$out/export.log"
    if [[ ! -f $EXPORT_DONE ]]; then
      tail -n 20 "$EXPORT_LOG"
      echo "the background export is still running after 5 minutes: call remote again once $EXPORT_DONE exists" >&2
      exit 3
    fi
    [[ $(cat "$EXPORT_DONE") == 0 ]] || echo "the background export failed (export.log); the check makes the packages itself"
  fi
  # The budget skips optional measurements (session.run, the largest sizes) to end in time.
  timeout 560 python3 -m benchmarks.gpu_check --work "$WORK" --out "$out" --budget-s "${BUDGET_S:-360}" "$@"
}

case "${1:-}" in
  prepare) prepare ;;
  start) start ;;
  part) part "$2" ;;
  remote) shift; remote "$@" ;;
  *) echo "usage: bash benchmarks/gpu_check.sh prepare | start | part K | remote [gpu_check.py options]" >&2; exit 2 ;;
esac
