#!/usr/bin/env bash
# jobs/extract.yaml (SmolLM2-135M-Instruct filling a three-field JSON schema) on the 44 quick
# and the 300 sample prompts, against the same jobs without the schema, whole processes timed
# from outside; the schema jobs' outputs are copied to $OUT (or /tmp) for
# scripts/check_structured.py (docs/perf.md, "Structured output").
#   bash scripts/bench_structured_sample.sh [MODEL]   # MODEL: a copy of the SmolLM2 GGUF file
set -u
cd "$(dirname "$0")/.."
LOGS=${OUT:-/tmp}
MODEL=()
[ $# -ge 1 ] && MODEL=(--set "model.path=$1")
run() { # label, extra args: one process, its wall time, its summary's figures
  local label=$1; shift
  rm -rf "/tmp/structured_$label"
  local start=$(date +%s%N)
  python -m bulkinfer run jobs/extract.yaml "${MODEL[@]}" --output "/tmp/structured_$label" \
    "$@" > /tmp/structured_log.txt 2>&1
  local rc=$? end=$(date +%s%N)
  echo "$label rc=$rc process $(( (end - start) / 1000000 )) ms"
  grep -E "\] engine|wall time|output tokens/s|cut short" /tmp/structured_log.txt | cut -c1-160
  { echo "== $label"; cat /tmp/structured_log.txt; } >> "$LOGS/structured_logs.txt"
  case $label in json_quick|json_prompts)  # for scripts/check_structured.py
    cp -r "/tmp/structured_$label/outputs" "$LOGS/$label" ;;
  esac
}
PLAIN=(--set task.response_format=null)
run warmup --set model.engine=reference  # converts the GGUF file once
for data in quick prompts; do
  INPUT=(--set "input.path=sample_data/$data.jsonl")
  run "json_$data" "${INPUT[@]}"
  run "plain_$data" "${INPUT[@]}" "${PLAIN[@]}"
  run "json_${data}_again" "${INPUT[@]}"
done
