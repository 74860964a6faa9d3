#!/usr/bin/env bash
# One check for a GPU node (issue 18): trains Llama 3.1 8B cut to 2 decoder layers (full width and
# vocabulary, random weights, mock data, bf16, no network) for 20 steps on one GPU with each torch
# backend (megatron, torchtitan, hf) and MaxText when its venv is present, and prints per backend:
# tokens/s, step time, TFLOP/s and MFU as metrics.jsonl reports them, the loss, the peak GPU memory
# seen by the vendor tool, and the attention path the run's log names; then megatron again in FP8
# (`fp8: hybrid` through TransformerEngine; where TE or the arch cannot run it, Primus's one-line
# refusal is printed as the reason it was skipped). Meant to take under 8 minutes.
#
#   bench/gpu_check.sh                 # on the GPU node
#   bench/gpu_check.sh --dry-run       # anywhere: print and `primus run ... --dry-run` every command
#   bench/gpu_check.sh --backends hf,megatron --steps 20 --seq 4096 --mbs 2
#   bench/gpu_check.sh --dry-run --platform rocm   # the plan for a ROCm node, from a host without one
#
# Environment: PRIMUS (the primus command; default: `primus` beside this Python, else on PATH),
# PRIMUS_MAXTEXT (MaxText's primus; default .venv312/bin/primus in the repository, skipped when
# absent), PRIMUS_GPU_CHECK_OUT (work folder; default a new temporary one, removed at the end
# unless KEEP=1), PRIMUS_GPU_CHECK_TIMEOUT (seconds per backend, default 150).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
BACKENDS="megatron,megatron_fp8,megatron_mla,torchtitan,hf,maxtext"
STEPS=20
SEQ=4096
MBS=2
PLATFORM_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --backends) BACKENDS="$2"; shift ;;
    --steps) STEPS="$2"; shift ;;
    --seq) SEQ="$2"; shift ;;
    --mbs) MBS="$2"; shift ;;
    --platform) PLATFORM_ARGS=(--platform "$2"); shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${PRIMUS:-}" ]; then
  if [ -x "$ROOT/.venv/bin/primus" ]; then PRIMUS="$ROOT/.venv/bin/primus"; else PRIMUS="primus"; fi
fi
PRIMUS_MAXTEXT="${PRIMUS_MAXTEXT:-$ROOT/.venv312/bin/primus}"
TIMEOUT="${PRIMUS_GPU_CHECK_TIMEOUT:-150}"
OUT="${PRIMUS_GPU_CHECK_OUT:-}"
if [ -z "$OUT" ]; then OUT="$(mktemp -d -t primus-gpu-check.XXXXXX)"; CLEAN_OUT=1; else CLEAN_OUT=0; fi
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PRIMUS_WORKSPACE="$OUT/ws" PRIMUS_CACHE_DIR="$OUT/cache"
# shellcheck disable=SC2329
cleanup() { if [ "$CLEAN_OUT" = 1 ] && [ "${KEEP:-0}" != 1 ]; then rm -rf "$OUT"; fi; }
trap cleanup EXIT

# Llama 3.1 8B (primus/presets/models/llama3.1_8B.yaml) with 2 of its 32 layers
MODEL='{family: llama, vocab_size: 128256, hidden_size: 4096, num_layers: 2, num_heads: 32, num_kv_heads: 8,
        ffn_hidden_size: 14336, max_position_embeddings: 131072, rope_theta: 500000.0,
        rope_scaling: {type: llama3, factor: 8.0, original_max_positions: 8192, low_freq_factor: 1.0,
                       high_freq_factor: 4.0}}'

# megatron_mla: DeepSeek-V3's layers (MLA at full size, YaRN, sigmoid routing with the selection bias,
# group-limited top-8) with 2 layers (1 dense, 1 MoE) and 16 of its 256 experts: with TransformerEngine
# installed megatron-core's TE spec builds MLA (primus_megatron.layers; CPU tests cover only the SDPA path)
MODEL_MLA='{family: deepseek, vocab_size: 129280, hidden_size: 7168, num_layers: 2, num_heads: 128,
        ffn_hidden_size: 18432, max_position_embeddings: 163840, norm_eps: 1.0e-6,
        rope_scaling: {type: yarn, factor: 40.0, original_max_positions: 4096, beta_fast: 32.0, beta_slow: 1.0,
                       mscale: 1.0, mscale_all_dim: 1.0},
        moe: {experts: 16, top_k: 8, expert_ffn: 2048, shared_experts: 1, first_dense_layers: 1,
              score_function: sigmoid, expert_bias: true, groups: 8, top_k_groups: 4, routed_scaling_factor: 2.5},
        mla: {q_lora_rank: 1536, kv_lora_rank: 512, qk_nope_head_dim: 128, qk_rope_head_dim: 64, v_head_dim: 128}}'

write_exp() {  # write_exp BACKEND -> the experiment file's path
  local backend="$1" file="$OUT/$1.yaml" overrides model="$MODEL"
  if [ "$backend" = megatron_mla ]; then model="$MODEL_MLA"; fi
  case "$backend" in
    # dump_pp_data: forward/backward timed by device events; use_rocm_mem_info: torch's memory figures
    megatron|megatron_mla) overrides='{log_interval: 1, disable_last_saving: true, save_interval: 100000,
                                      dump_pp_data: true, use_rocm_mem_info: true}' ;;
    megatron_fp8) overrides='{log_interval: 1, disable_last_saving: true, save_interval: 100000,
                              use_rocm_mem_info: true, fp8: hybrid}' ;;
    torchtitan) overrides='{compile: {enable: false}, activation_checkpoint: {mode: none}}' ;;
    hf) overrides='{optim: adamw_torch_fused}' ;;
    maxtext) overrides='{enable_checkpointing: false, dataset_type: synthetic}' ;;
  esac
  cat > "$file" <<EOF
work_group: gpu-check
user_name: bench
exp_name: $backend-2layers
workspace: $OUT/ws
modules:
  pre_trainer:
    framework: ${backend%%_*}
    config: pre_trainer.yaml
    model: $model
    train: {steps: $STEPS, lr: 1.0e-5, warmup_steps: 2, micro_batch_size: $MBS, global_batch_size: $MBS,
            seq_length: $SEQ, seed: 1234, precision: bf16, log_interval: 1}
    data: {mock: true}
    checkpoint: {interval: 100000, resume: never}
    overrides: $overrides
EOF
  echo "$file"
}

gpu_mem_used_mib() {  # the most memory in use on any GPU now, MiB (nothing without a vendor tool)
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | sort -n | tail -1
  elif command -v rocm-smi >/dev/null 2>&1; then
    rocm-smi --showmeminfo vram --csv 2>/dev/null | awk -F, 'NR>1 && $3 ~ /^[0-9]+$/ {print int($3/1048576)}' \
      | sort -n | tail -1
  fi
}

summary() {  # summary BACKEND RUN_DIR PEAK_MIB BASE_MIB SECONDS
  python3 - "$@" <<'EOF'
import json, re, statistics, sys
from pathlib import Path
backend, run_dir, peak, base, seconds = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rows = []
try:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            rows.append(r)
except (OSError, ValueError):
    pass
if not rows:
    print(f"{backend:<11} FAILED: no metrics (see {run_dir}/logs)")
    sys.exit(1)
latest = {}
for r in rows:
    latest[r["step"]] = r
rows = [latest[s] for s in sorted(latest)]
steady = rows[5:] or rows  # the first steps include compilation and warm-up
def med(key):
    vals = [r[key] for r in steady if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None
tok, st, tf, mfu = med("tokens_per_s"), med("step_time_s"), med("tflops"), med("mfu")
attention = ""
for log in sorted(run_dir.glob("logs/**/*.log")):
    m = re.search(r"[^\n]*\battention\b[^\n]*", log.read_text(errors="replace"), re.I)
    if m:
        attention = m.group(0).strip()[-110:]
        break
used = int(peak) - int(base) if peak.isdigit() and base.isdigit() else None
parts = [f"{backend:<11}", f"steps {rows[-1]['step']}", f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}",
         f"{tok:,.0f} tok/s" if tok else "tok/s ?", f"step {st:.3f} s" if st else "",
         f"{tf:,.1f} TFLOP/s" if tf else "TFLOP/s not reported", f"MFU {100 * mfu:.1f}%" if mfu else "",
         f"peak GPU mem {used / 1024:.1f} GiB" if used is not None else "peak GPU mem ?", f"wall {seconds} s"]
print("  ".join(p for p in parts if p))
print(f"{'':<11} metrics keys: {', '.join(sorted(rows[-1]))}")
if attention:
    print(f"{'':<11} attention: {attention}")
memory = ""
for log in sorted(run_dir.glob("logs/**/*.log")):
    found = re.findall(r"GPU memory after step \d+: [^\n]*", log.read_text(errors="replace"))
    memory = found[-1] if found else memory
if memory:
    print(f"{'':<11} {memory}")
try:  # megatron's dump_pp_data: the device-event time of each step's forwards and backwards
    events = json.loads((run_dir / "pp_data" / "rank-0.json").read_text())["primus"]["events"]
    busy = {}
    for e in events:
        if e["kind"] in ("forward", "backward") and e["step"] > 5:
            busy[e["step"]] = busy.get(e["step"], 0.0) + (e["end_us"] - e["start_us"]) / 1e6
    if busy and st:
        print(f"{'':<11} device-timed forward+backward {statistics.median(busy.values()):.3f} s of the "
              f"{st:.3f} s step (dump_pp_data)")
except (OSError, ValueError, KeyError):
    pass
EOF
}

status=0
IFS=',' read -r -a LIST <<< "$BACKENDS"
for backend in "${LIST[@]}"; do
  cmd="$PRIMUS"
  if [ "$backend" = maxtext ]; then
    if [ ! -x "$PRIMUS_MAXTEXT" ]; then echo "maxtext     skipped: no MaxText venv ($PRIMUS_MAXTEXT)"; continue; fi
    cmd="$PRIMUS_MAXTEXT"
  fi
  # shellcheck disable=SC2086
  if ! $cmd backends 2>/dev/null | grep -qE "^${backend%%_*} +[a-z]"; then
    echo "$backend     skipped: not installed for $cmd"; continue
  fi
  exp="$(write_exp "$backend")"
  # shellcheck disable=SC2206
  run=($cmd run "$exp" --nproc-per-node 1 "${PLATFORM_ARGS[@]}")
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ ${run[*]}"
    if out="$("${run[@]}" --dry-run 2>&1)"; then
      echo "dry-run ok: $backend $(grep -m1 '^module ' <<< "$out")"
    elif [ "$backend" = megatron_fp8 ] && grep -q '^primus: error: .*fp8' <<< "$out"; then
      echo "megatron_fp8 skipped: $(grep -m1 '^primus: error:' <<< "$out")"
    else
      echo "dry-run FAILED: $backend"; echo "$out" | tail -20; status=1
    fi
    continue
  fi
  echo "+ ${run[*]}"
  base="$(gpu_mem_used_mib)"; peak="$base"
  ( while sleep 0.5; do gpu_mem_used_mib; done ) > "$OUT/$backend.mem" 2>/dev/null &
  poller=$!
  start=$SECONDS
  timeout --signal=TERM --kill-after=20 "$TIMEOUT" "${run[@]}" > "$OUT/$backend.out" 2>&1
  code=$?
  kill "$poller" 2>/dev/null; wait "$poller" 2>/dev/null
  peak="$(sort -n "$OUT/$backend.mem" 2>/dev/null | tail -1)"
  run_dir="$OUT/ws/gpu-check/bench/$backend-2layers"
  if [ "$backend" = megatron_fp8 ] && [ "$code" = 2 ] && grep -q '^primus: error: .*fp8' "$OUT/$backend.out"; then
    echo "megatron_fp8 skipped: $(grep -m1 '^primus: error:' "$OUT/$backend.out")"  # no TE, or not this arch
    continue
  fi
  if [ "$code" != 0 ]; then
    echo "$backend     FAILED: exit $code after $((SECONDS - start)) s; last lines:"; tail -15 "$OUT/$backend.out"
    status=1
  fi
  summary "$backend" "$run_dir" "${peak:-?}" "${base:-?}" "$((SECONDS - start))" || status=1
  rm -rf "$run_dir"  # a few GB of final weights per backend
done
exit $status
