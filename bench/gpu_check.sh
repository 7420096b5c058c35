#!/usr/bin/env bash
# GPU check: the kernels' GPU tests (compiled, in parallel shards), then the benchmarks, then a summary table,
# in under 8 minutes on a cold machine (empty Triton / inductor caches). Every step has a hard time limit, cut
# further so that the whole run ends by DEADLINE_S; every benchmark row and test outcome is appended to its CSV
# the moment it is measured (bench/_csvlog.py), so a step cut by its limit keeps what it measured.
#
#   bash bench/gpu_check.sh [OUTDIR]            # on a CUDA machine, from anywhere; OUTDIR default
#                                               #   bench/results/<card>-<UTC date>
#   bash bench/gpu_check.sh --smoke [OUTDIR]    # the same pipeline on CPU: Triton interpreter, tiny shapes
#                                               #   (run by tests/test_gpu_check.py; default OUTDIR under /tmp)
# Env: PYTHON (default python3), COMMIT (default git HEAD), SHARDS (test processes, default 8),
#      GPU_TEST_FILES (default the two kernel test files and the fused-kernel prior test), GPU_TEST_MARK (default "not slow": every kernel test,
#      those marked gpu first; "gpu" for the GPU-scale tests alone), DEADLINE_S (default 470).
#
# Budget (seconds on the GPU machine; limit = hard cut). Kernel builds, counted on CPU with
# bench/count_builds.py (csrc_notes/README.md "How to measure"): 176 distinct for the kernel tests (42 for the
# gpu-marked ones), ~2.2 s each cold -> 387 s serial; over 8 shards at most 34 per shard -> ~75 s + start-up.
#   env 30 | tests 140 | bench_attention 60 | bench_decoder 40 | bench_train_step 125 | bench_score 55 |
#   summary 30 (takes ~1) -> at most 480 with the kill grace, and DEADLINE_S = 470 cuts the last steps first.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
PY=${PYTHON:-python3}
commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
deadline=${DEADLINE_S:-470}
t_start=$(date +%s)
status=0

if [ $smoke = 1 ]; then
  export TRITON_INTERPRET=1
  dev=cpu
  card=cpu-smoke
  out=${1:-$(mktemp -d /tmp/gpu_check_smoke.XXXXXX)}
else
  unset TRITON_INTERPRET
  dev=cuda
  card=$(timeout 60 $PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null) || {
    echo "gpu_check: no CUDA device visible to torch (use --smoke for the CPU pipeline)" >&2; exit 2; }
  out=${1:-bench/results/${card}-$(date -u +%Y%m%d-%H%M)}
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)

# step NAME LIMIT CMD...: runs CMD under min(LIMIT, time left before the deadline), logs to $out/NAME.log,
# prints the log's last lines and the step's wall time; a timeout or failure sets status=1 and goes on.
step() {
  local name=$1 limit=$2; shift 2
  local now left t0 rc
  now=$(date +%s); left=$(( deadline - (now - t_start) ))
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit} s) =="
  if [ "$limit" -lt 5 ]; then echo "skipped: no time left before the ${deadline} s deadline"; status=1; return; fi
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$out/$name.log" 2>&1; rc=$?
  grep -v -E "Warning|warnings.warn|^W[0-9]{4} " "$out/$name.log" | tail -n "${TAIL:-25}"
  echo "-- $name: rc $rc, $(( $(date +%s) - t0 )) s$([ $rc = 124 ] || [ $rc = 137 ] && echo ' (time limit: rows so far kept)')"
  [ $rc = 0 ] || status=1
}

step env 30 $PY - <<PY
import torch, platform
from importlib import metadata
dev = "$dev"
print("card", torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (smoke, triton interpreter)")
print("torch", torch.__version__); print("triton", metadata.version("triton")); print("cuda", torch.version.cuda)
print("python", platform.python_version()); print("commit", "$commit")
PY
cp "$out/env.log" "$out/env.txt"

bench() { echo "$PY bench/$1.py --device $dev --csv $out/$1.csv --commit $commit"; }
if [ $smoke = 1 ]; then
  # interpreter: two shards of a few small kernel tests (checks the sharded runner and its CSV, not the kernels)
  step tests 60 $PY bench/gpu_tests.py --shards 2 --timeout 50 --device cpu --csv "$out/tests.csv" --commit "$commit" \
    -- tests/test_kernel_decoder_loss.py tests/test_kernel_cross_attention.py -m "not slow" \
    -k "test_batch_of_one or test_gpu_deterministic_large"
  step bench_attention 60 $(bench bench_attention) --batch 1 --heads 2 --rep 1
  step bench_decoder 40 $(bench bench_decoder) --batch 2 --dim 32 --reps 1
  step bench_train_step 60 $(bench bench_train_step) --presets small --modalities id --steps 1
  step bench_score 60 $(bench bench_score) --presets small --modalities id --backends triton,sdpa,torch \
    --pairs 4 --visual-pairs 4 --users 20 --videos 200 --interactions 2000
else
  # the kernel tests on the compiled path (gpu-marked GPU-scale ones first), in parallel shards: cold compiles
  # dominate (the slow ones are the ahead-of-time compile checks, which need no GPU)
  step tests 140 $PY bench/gpu_tests.py --shards "${SHARDS:-8}" --timeout 130 --device cuda --csv "$out/tests.csv" \
    --commit "$commit" -- ${GPU_TEST_FILES:-tests/test_kernel_cross_attention.py tests/test_kernel_decoder_loss.py tests/test_priors.py::test_fused_kernel_prior_against_reference} \
    -m "${GPU_TEST_MARK:-not slow}"
  # benchmarks: triton, sdpa, eager, compile in each (torch.compile last: its cold compile is the slowest)
  step bench_attention 60 $(bench bench_attention)
  step bench_decoder 40 $(bench bench_decoder)
  step bench_train_step 125 $(bench bench_train_step) --presets paper-code,small --modalities both,id
  step bench_score 55 $(bench bench_score) --presets small,paper-code --modalities id,both \
    --backends triton,sdpa,torch --pairs 400000 --visual-pairs 100000 --users 200 --videos 5000 --interactions 40000
fi
echo
echo "== summary ($out, $(( $(date +%s) - t_start )) s so far) =="
timeout 30 $PY bench/summarize.py "$out" || status=1
echo "gpu_check: $([ $status = 0 ] && echo ok || echo 'some step failed or was cut (see its .log)'), " \
     "$(( $(date +%s) - t_start )) s, results in $out"
exit $status
