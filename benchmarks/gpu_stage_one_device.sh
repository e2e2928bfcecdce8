#!/usr/bin/env bash
# Stage one on the GPU machine, from the repository root, carrying .device (gpu_stage_one_prep.py):
#   bash benchmarks/gpu_stage_one_device.sh        (run: carry [".device"], timeout_s 540)
# Installs the carried wheels, then runs gpu_stage_one.py three times into one JSON: the
# version-free sections, featcache before (fe29c6b) and after (HEAD), each from its own --target;
# torch.compile only if time is left. About 7.5 minutes (BUDGET=440 s of runs); results in $OUT.
set -u
T=${TMPDIR:-/tmp}/gs1; O=${OUT:-$T/out}; D=.device; J=$O/stage_one.json
mkdir -p "$T" "$O"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
P="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target"
$P "$T/site" $D/whl/*.whl || exit 1
for v in before after; do $P "$T/$v" $D/fc/$v/*.whl || exit 1; done
END=$((SECONDS + ${BUDGET:-440}))
run() {  # label, seconds, sections, featcache install
  local left=$((END - SECONDS - 10)) d=$2
  [ "$left" -lt "$d" ] && d=$left
  [ "$d" -lt "${5:-30}" ] && { echo "== $1 skipped: ${left}s left" | tee -a "$O/log.txt"; return; }
  echo "== $1: ${d}s, featcache $4" | tee -a "$O/log.txt"
  PYTHONPATH="$T/$4:$T/site" timeout $((d + 40)) python3 benchmarks/gpu_stage_one.py --assets $D \
    --work "$T/work" --label "$1" --deadline "$d" --sections "$3" --out "$J" 2>&1 | tee -a "$O/log.txt"
  echo "== $1 exit ${PIPESTATUS[0]}" | tee -a "$O/log.txt"
}
V=env,encoder,decode,writes,extract,decompose,knn_featcache
run common 80 env,ceilings,bare,decode_proto,gpu_decode,knn after
run before 170 $V before
run after 170 $V after
run compile 120 compile after 95
python3 benchmarks/gpu_stage_one.py --table "$J" 2>&1 | tee "$O/table.txt"
