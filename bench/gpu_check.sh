#!/usr/bin/env bash
# GPU check: compiled kernels vs the reference (fp32/fp16/bf16, gradients), then the benchmarks, in < 8 min.
# Usage (on a machine with a CUDA GPU, from the repo root):  bash bench/gpu_check.sh [OUTDIR]
# Writes CSVs (with card, versions and commit) to OUTDIR (default bench/results/<card>-<date>) and prints a table.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
card=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null) || {
  echo "gpu_check: no CUDA device visible to torch" >&2; exit 2; }
out=${1:-bench/results/${card}-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$out"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
$PY - <<PY > "$out/env.txt"
import torch, triton, platform
print("card", torch.cuda.get_device_name(0)); print("torch", torch.__version__); print("triton", triton.__version__)
print("cuda", torch.version.cuda); print("python", platform.python_version()); print("commit", "$commit")
PY
cat "$out/env.txt"
status=0
echo "== kernel tests on the GPU (compiled) =="
timeout 120 $PY -m pytest -q -x tests/test_kernel_cross_attention.py tests/test_kernel_decoder_loss.py \
  2>&1 | tee "$out/tests.txt" | tail -n 15 || status=1
echo "== benchmarks =="
# per-benchmark time limits keep the whole check under 8 minutes (each prints its rows as it goes)
for spec in bench_attention:80 bench_decoder:50 bench_train_step:150; do
  b=${spec%%:*}; t=${spec##*:}
  timeout "$t" $PY bench/$b.py --device cuda --csv "$out/$b.csv" --commit "$commit" 2>&1 | tee "$out/$b.log" \
    | grep -v Warning | tail -n 30 || status=1
done
echo "== end-to-end scoring (read, assemble, model, write; time split in the CSV) =="
timeout 60 $PY bench/bench_score.py --device cuda --presets small,paper-code --modalities id,both \
  --backends torch,triton --pairs 400000 --visual-pairs 100000 --users 200 --videos 5000 --interactions 40000 \
  --csv "$out/bench_score.csv" --commit "$commit" 2>&1 | tee "$out/bench_score.log" | grep -v Warning | tail -n 12 || status=1
echo "results in $out"
exit $status
