#!/usr/bin/env bash
# Every GPU check and run of the project, as one script for a lent CUDA machine
# (about 8 minutes on an H100/H200): the unit tests on CUDA, the speed
# benchmark (`python -m mlbook bench`, all workloads, then TF32 for the matmul
# path), and the Omniglot 5-way cells of MAML, first-order MAML and Reptile,
# each trained for a fixed wall-clock budget with the step in a CUDA graph and
# evaluated on 600 test tasks. Results go to OUT (default gpu-out):
# log.txt, tests.log, bench_gpu*.json, cells.tar.gz (result files + models).
#
#   bash scripts/gpu_checks.sh [OUT]
#
# Needs python3 with torch (CUDA), numpy, tqdm, pytest, pillow; Omniglot via
# MLBOOK_DATA (and a cache via MLBOOK_CACHE). PARTS picks what runs (default
# "tests bench cells"; "speed" times levers of `bench --experiments` in the
# graphed step of the 5-way and 20-way Conv4 MAML workloads: CUDA's default
# step against itself with channels-last activations in every pass (slower
# before the fused block and compiled passes took over batch norm; cuDNN's
# grouped convolutions convert NCHW to NHWC and back) and with the first
# inner step's convolutions dense over all tasks (every task starts from
# theta: grouped_conv.shared_conv2d), the 20-way step with TF32 matmuls, and
# a profile of one 20-way step, the one still above its target; "record"
# the command of records/bench-h200-defaults.json, to run again once a lever
# has become a default; ALL_LEVERS=1 adds to "speed" the levers timed before
# (fused Adam, mlbook.fused_block, the first convolution as a matmul, each
# alone, all three, with grouped or bmm convolutions, then with TF32
# matmuls; the block and the matmul are CUDA's defaults, "mlbook unfused"
# the step without them); "cudnn" a cudnn.benchmark run;
# TF32=1 adds a benchmark with TF32 matmuls; COMPILE=1 adds, to "speed", the
# compiled torch.func meta-gradient of `bench --compile`; TESTS picks the
# test files). CELLS="method shot minutes,..."
# picks the cells; DEVICE=cpu SCALE=0.01 is a dry run of the same steps on a
# machine without a GPU (in a copy of the tree: --ship writes checkpoints);
# "short" only against the GPU run's budget: some 15 minutes on two cores.
set -u
out=${1:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}
scale=${SCALE:-1}
t0=$(date +%s)
say() { echo "=== [$(($(date +%s) - t0)) s] $*"; }

{
say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

parts=${PARTS:-tests bench cells}
tests=${TESTS:-tests/test_maml.py tests/test_reptile_transfer.py tests/test_graph.py tests/test_grouped_conv.py tests/test_fused_block.py tests/test_train.py tests/test_tasks_and_errors.py}
if [[ " $parts " == *" tests "* ]]; then
  say "unit tests, their CUDA cases (the CPU ones run in CI)"
  # -k: a fresh machine compiles mlbook.fused_block for every test shape on
  # each device, over a minute per compiled case: leave the CPU's out here
  timeout 420 $py -m pytest -q -p no:cacheprovider -k "not cpu" $tests \
    >"$out/tests.log" 2>&1
  echo "pytest exit $?"; tail -4 "$out/tests.log"
fi

gflag=""; [ "$dev" = cuda ] && gflag="--cuda-graph"
if [ "$dev" = cuda ] && [[ " $parts " == *" bench "* ]]; then
  say "benchmark"
  timeout 240 $py -m mlbook bench --device "$dev" --rounds 3 --round-seconds 0.15 \
    --out "$out/bench_gpu.json"
  echo "bench exit $?"
  [ -n "${TF32:-}" ] && say "benchmark, TF32 matmuls (mlbook variants)" && \
  timeout 90 $py -m mlbook bench --device "$dev" --workloads conv4,conv4-20w --tf32 \
    --skip "per-task loop,torch.func vmap,vmap + graph" --rounds 3 \
    --round-seconds 0.15 --out "$out/bench_gpu_tf32.json"
  echo "bench exit $?"
fi

if [[ " $parts " == *" notebooks "* ]]; then
  # Every chapter, executed by nbval with CUDA visible (as on a Colab GPU
  # runtime). Jupyter's packages travel as wheels in .whl/ when missing.
  say "chapters under nbval"
  if [ -d .whl ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
  timeout 240 $py -m pytest -q -p no:cacheprovider --nbval-lax \
    --nbval-cell-timeout=300 book >"$out/nbval.log" 2>&1
  echo "nbval exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$out/nbval.log" | tail -15
fi

if [ "$dev" = cuda ] && [[ " $parts " == *" cudnn "* ]]; then
  say "mlbook and its baselines with cudnn.benchmark"
  timeout 100 $py -m mlbook bench --workloads conv4,conv4-20w --cudnn-benchmark \
    --skip "per-task loop,torch.func vmap,mlbook bmm,higher,mlbook bmm + graph" \
    --rounds 3 --round-seconds 0.15 --out "$out/bench_speed_cudnn_benchmark.json"
fi

if [ "$dev" = cuda ] && [[ " $parts " == *" record "* ]]; then
  say "the defaults record again (records/bench-h200-defaults.json's command)"
  timeout 300 $py -m mlbook bench --workloads conv4,conv4-20w,conv4-fo,conv4-reptile \
    --only "mlbook + graph,uncompiled passes + graph,vmap + graph" \
    --rounds 3 --round-seconds 0.15 --out "$out/bench-h200-defaults.json"
  echo "bench exit $?"
fi

if [ "$dev" = cuda ] && [[ " $parts " == *" speed "* ]]; then
  say "CUDA's default step against itself with the untimed levers"
  # the first run compiles mlbook.fused_block and the passes differentiated
  # once (torch.compile) for each shape; "mlbook" has CUDA's defaults
  timeout 240 $py -m mlbook bench --workloads conv4,conv4-20w --experiments \
    --only "mlbook + graph,NHWC + graph,shared first step + graph" \
    --rounds 3 --round-seconds 0.15 --out "$out/bench_new_levers.json"
  echo "bench exit $?"
  say "the 20-way step with TF32 matmuls too (cuDNN's convolutions use TF32 already)"
  timeout 150 $py -m mlbook bench --workloads conv4-20w --experiments --tf32 \
    --only "mlbook + graph,shared first step + graph" --rounds 3 --round-seconds 0.15 \
    --out "$out/bench_new_levers_tf32.json"
  echo "bench exit $?"
  say "profile of one eager 20-way step of CUDA's default"
  timeout 120 $py -m mlbook bench --workloads conv4-20w --profile --experiments --rounds 1 \
    --only "mlbook + graph" --round-seconds 0.05 --out "$out/bench_profile.json"
  say "the rows above, and each against CUDA's default step"
  $py - "$out"/bench_new_levers.json "$out"/bench_new_levers_tf32.json <<'PY'
import json, sys
from mlbook import bench
rows = []
for path in sys.argv[1:]:
    try:
        found = json.load(open(path))
    except Exception as err:  # a part cut short before its first workload
        print(path, "unreadable:", err)
        continue
    for r in found["rows"]:
        if found.get("tf32_matmul"):
            r["variant"] += " (TF32 matmuls)"
        rows.append(r)
print(bench.format_rows(rows, compact=True))
base = {r["workload"]: r["ms_per_step"] for r in rows
        if r["variant"] == "mlbook + graph"}
for r in rows:
    if r["variant"] != "mlbook + graph" and r["workload"] in base:
        ratio = base[r["workload"]] / r["ms_per_step"]
        print(f"{r['workload']}: {r['variant']} {ratio:.2f}x the default step")
PY
  if [ -n "${ALL_LEVERS:-}" ]; then
    timeout 300 $py -m mlbook bench --workloads conv4,conv4-20w,conv4-fo --experiments \
      --only "mlbook + graph,mlbook unfused + graph,fused every pass + graph,fused Adam + graph,fused block + graph,conv1 matmul + graph,levers combined + graph,levers bmm + graph" \
      --rounds 3 --round-seconds 0.15 --out "$out/bench_levers.json"
    echo "bench exit $?"
    say "the same with TF32 matmuls (cuDNN's convolutions use TF32 already)"
    timeout 150 $py -m mlbook bench --workloads conv4,conv4-20w --experiments --tf32 \
      --only "mlbook + graph,levers combined + graph,levers bmm + graph" \
      --rounds 3 --round-seconds 0.15 --out "$out/bench_levers_tf32.json"
    echo "bench exit $?"
  fi
  if [ -n "${COMPILE:-}" ]; then
    say "torch.compile of the whole Conv4 meta-gradient (torch.func), beside mlbook"
    timeout 300 $py -m mlbook bench --workloads conv4,conv4-fo --compile \
      --skip "per-task loop,torch.func vmap,vmap + graph,higher,mlbook bmm,mlbook bmm + graph" \
      --rounds 3 --round-seconds 0.15 --out "$out/bench_compiled.json"
    echo "bench exit $?"
  fi
fi

# The faster way of batching Conv4 on this card, read off the benchmark.
impl=${IMPL:-$($py - "$out/bench_gpu.json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
    t = {r["variant"]: r["ms_per_step"] for r in rows if r["workload"] == "conv4"}
    print("bmm" if t["mlbook bmm + graph"] < t["mlbook + graph"] else "grouped")
except Exception:
    print("grouped")
EOF
)}
[[ " $parts " == *" cells "* ]] || cells=none
say "Omniglot 5-way cells (conv impl: $impl)"
[ "${cells:-}" = none ] || cells=${CELLS:-"maml 1 0.75,maml 5 0.5,fomaml 1 0.4,fomaml 5 0.4,reptile 1 0.4,reptile 5 0.4"}
cell_list=()
[ "$cells" = none ] || IFS=, read -ra cell_list <<<"$cells"
for cell in "${cell_list[@]}"; do
  set -- $cell
  minutes=$($py -c "print($3 * $scale)")
  say "cell $1 5w$2s, $minutes min"
  timeout 200 $py -m mlbook.omniglot_repro --method "$1" --way 5 --shot "$2" \
    --minutes "$minutes" $gflag --conv-impl "$impl" --device "$dev" \
    --out runs/gpu --ship --threads 4 >"$out/cell.log" 2>&1
  rc=$?
  grep -v "it/s\]" "$out/cell.log" | tail -6
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ -n "$gflag" ]; then
    say "exit $rc with the CUDA graph: the same cell without it"
    rm -rf "runs/gpu/omniglot-$1-5w$2s"
    timeout 200 $py -m mlbook.omniglot_repro --method "$1" --way 5 --shot "$2" \
      --minutes "$minutes" --conv-impl "$impl" --device "$dev" \
      --out runs/gpu --ship --threads 4 2>&1 | grep -v "it/s\]" | tail -6
  fi
done
rm -f "$out/cell.log"
[ ${#cell_list[@]} -eq 0 ] || tar czf "$out/cells.tar.gz" runs/gpu/*/result.json \
  mlbook/checkpoints/omniglot-* 2>&1
say "done"
} 2>&1 | tee "$out/log.txt"
