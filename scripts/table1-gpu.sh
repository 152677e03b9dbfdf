#!/usr/bin/env bash
# Table 1 on one GPU machine: every cell of the grid in its own process, all at once.
#
#   scripts/table1-gpu.sh throughput      # each cell type alone for 6,400 examples: GPU steps/s
#   scripts/table1-gpu.sh launch          # start the grid in the background (setsid) and return
#   scripts/table1-gpu.sh watch SECONDS   # print progress until every cell ends or SECONDS pass
#   scripts/table1-gpu.sh collect DIR     # tables, plots and a tarball of the runs without weights
#   scripts/table1-gpu.sh sweep           # time vs rate decoding: tau_d 5/10/30 and a parameter-matched
#                                         # time decoder, vdib-bptt, both encodings, seed 0 (ROOT=runs/tvr)
#   scripts/table1-gpu.sh sweep-collect DIR
#
# Environment: ROOT (runs/table1-gpu), EXAMPLES (200000), SEEDS ("0 1 2"), PYTHON (python3),
# VDIB_MNIST_DIR (the MNIST idx folder). The `vdib` rule with a 10x lower encoder learning rate
# (`rule.lr=1e-4`, `rule.options.decoder_lr=1e-3`) runs beside the grid under ROOT-lr, seed 0.
# Cells are resumable: running `launch` again continues unfinished cells from their checkpoints.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ROOT=${ROOT:-runs/table1-gpu}
EXAMPLES=${EXAMPLES:-200000}
SEEDS=${SEEDS:-"0 1 2"}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1

cell() {  # root seed rule enc dec [extra --set ...]
  local root=$1 seed=$2 rule=$3 enc=$4 dec=$5; shift 5
  local name="$enc-$dec-$rule-s$seed"
  mkdir -p "$root/logs" "$root/out"
  setsid nohup "$PY" -m vdib_cli table1 --examples "$EXAMPLES" --seeds "$seed" --rules "$rule" \
    --encodings "$enc" --decodings "$dec" --root "$root" --out "$root/out/$name" \
    --set train.checkpoint_every=50000 "$@" \
    >"$root/logs/$name.log" 2>&1 </dev/null &
}

case "${1:-}" in
throughput)
  mkdir -p "$ROOT-throughput"
  for rule in vdib vdib-bptt; do for dec in time rate; do
    t0=$(date +%s%N)
    "$PY" -m vdib_cli table1 --examples 6400 --seeds 0 --rules "$rule" --encodings rate --decodings "$dec" \
      --root "$ROOT-throughput" --out "$ROOT-throughput/out" --set eval.final_limit=1000 --set train.eval_every=1000000 --set train.checkpoint_every=1000000 \
      2>&1 | grep '^{"study"' || true
    echo "wall $(( ($(date +%s%N) - t0) / 1000000 )) ms for $rule/$dec (200 steps of 32 + a 1,000-digit eval)"
  done; done ;;
launch)
  for seed in $SEEDS; do for rule in vdib vdib-bptt; do for enc in rate ttfs; do for dec in time rate; do
    cell "$ROOT" "$seed" "$rule" "$enc" "$dec"
  done; done; done; done
  for enc in rate ttfs; do for dec in time rate; do
    cell "$ROOT-lr" 0 vdib "$enc" "$dec" --variant vdib-lr --set rule.lr=1e-4 --set rule.options.decoder_lr=1e-3
  done; done
  sleep 2; echo "launched $(pgrep -fc 'vdib_cli table1') cells" ;;
sweep)
  for tau in 5 10 30; do for enc in rate ttfs; do for dec in time rate; do
    cell "$ROOT/tau$tau" 0 vdib-bptt "$enc" "$dec" --set model.tau_d=$tau
  done; done; done
  # the time decoder narrowed to the rate decoder's parameter count at tau_d = 30:
  # rate-mlp 256*3840 + 3840*784 = 4.0 M weights; mlp 7680*h + h*784 = 4.0 M for h = 473
  for enc in rate ttfs; do
    cell "$ROOT/tau30-matched" 0 vdib-bptt "$enc" time --set model.decoder_options.hidden=473
  done
  sleep 2; echo "launched $(pgrep -fc 'vdib_cli table1') cells" ;;
sweep-collect)
  out=${2:?sweep-collect DIR}
  mkdir -p "$out"
  for sub in "$ROOT"/*/; do
    "$PY" -m vdib_cli table1 --collect-only --root "$sub" --out "$out/$(basename "$sub")" | tail -1
  done
  cat "$ROOT"/*/cells.jsonl > "$out/cells.jsonl" 2>/dev/null || true  # cell records for vdib time-vs-rate --tau-cells
  tar czf "$out/runs.tgz" --exclude='*.safetensors' --exclude='checkpoints' "$ROOT" 2>/dev/null
  grep -l -i 'error\|traceback' "$ROOT"/*/logs/*.log 2>/dev/null || true ;;
watch)
  end=$(( $(date +%s) + ${2:-540} ))
  while :; do
    n=$(pgrep -fc 'vdib_cli table1' || true)
    line=""
    for m in $(find "$ROOT" "$ROOT-lr" -name metrics.jsonl 2>/dev/null | sort); do
      [ -f "$m" ] || continue
      ex=$(tail -1 "$m" | sed -n 's/.*"examples": \([0-9]*\).*/\1/p')
      line="$line ${m#"$ROOT"/}"; line="${line%/metrics.jsonl}=$((${ex:-0} / 1000))k"
    done
    echo "$(date +%T) running=$n$line"
    [ "$n" -eq 0 ] && break
    [ "$(date +%s)" -ge "$end" ] && break
    sleep 30
  done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true ;;
collect)
  out=${2:?collect DIR}
  mkdir -p "$out"
  "$PY" -m vdib_cli table1 --collect-only --root "$ROOT" --out "$out" | tail -1
  "$PY" -m vdib_cli table1 --collect-only --root "$ROOT-lr" --out "$out/lr" | tail -1
  tar czf "$out/runs.tgz" --exclude='*.safetensors' --exclude='checkpoints' "$ROOT" "$ROOT-lr" \
    "$ROOT-throughput" 2>/dev/null
  cat "$ROOT"/cells.jsonl "$ROOT"-lr/cells.jsonl 2>/dev/null || true  # cell records (vdib time-vs-rate --cells)
  grep -l -i 'error\|traceback' "$ROOT"/logs/*.log "$ROOT"-lr/logs/*.log 2>/dev/null || true ;;
*)
  sed -n '2,13p' "$0"; exit 2 ;;
esac
