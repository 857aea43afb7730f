#!/usr/bin/env bash
# Generator robustness (issue 15) on a lent GPU machine (device tool: torch + CUDA installed,
# nothing downloadable; 16 CPU cores). Carried from here (git-ignored):
#   $WHL (.whl)  cp312 wheels: pymatgen(-core), monty, ruamel.yaml(+clib), orjson, palettable,
#               uncertainties, bibtexparser, spglib, ase, polars 1.30, pyxtal, pyocse, vasprun-xml
#   .devcarry/data/mp_symmetry.parquet   mp_symmetry of the shared MP file (27,248 rows)
# GPU_RUNS go to CUDA (GPU_JOBS processes share the GPU), CPU_RUNS to one core each (CPU_JOBS
# processes); both write <variant>-<seed>.json into $OUT/generator/runs as each run finishes, so a
# time limit keeps the finished runs. The summary (bench_generator.json/.md) goes to $OUT.
# Dry run here: SKIP_INSTALL=1 PY=.venv/bin/python EPOCHS=1 N_SAMPLES=2000 GPU_RUNS= \
#   CPU_RUNS="paper:0" OUT=/tmp/gen_dry bash benchmarks/gpu_generator.sh
set -uo pipefail
out=${OUT:-/tmp/gpu_generator}
mkdir -p "$out/generator"
PY=${PY:-python3}
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    t0=$(date +%s)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHL:-.whl}/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    echo "wheels installed in $(( $(date +%s) - t0 )) s"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SYM=${SYM:-.devcarry/data/mp_symmetry.parquet}
common=(--symmetry "$SYM" --epochs "${EPOCHS:-120}" --n-samples "${N_SAMPLES:-100000}"
        --symmetry-rows "${SYMMETRY_ROWS:-20000}" --repair ${REPAIR:-none} --out "$out/generator"
        --summary-dir "$out" --note "${NOTE:-lent GPU machine (device tool), 16 CPU cores}")
pids=()
if [ -n "${GPU_RUNS:-}" ]; then
    setsid $PY benchmarks/bench_generator.py "${common[@]}" --device cuda --jobs "${GPU_JOBS:-4}" --runs $GPU_RUNS \
        --name gpu_part > "$out/gpu_part.log" 2>&1 & pids+=($!)
fi
if [ -n "${CPU_RUNS:-}" ]; then
    setsid $PY benchmarks/bench_generator.py "${common[@]}" --device cpu --jobs "${CPU_JOBS:-10}" --runs $CPU_RUNS \
        --name cpu_part > "$out/cpu_part.log" 2>&1 & pids+=($!)
fi
# the limit: stop the runs in time to write the summary of those that finished
( sleep "${BUDGET_S:-520}"; echo "budget reached: stopping the remaining runs"
  for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null; done ) &
watchdog=$!
for p in "${pids[@]}"; do wait "$p"; done
kill "$watchdog" 2>/dev/null
grep -h "done at\|FAILED" "$out"/*_part.log
# what comes back from $OUT: at most 8 files, 2 folders down
tar czf "$out/generator_runs.tgz" -C "$out/generator" runs checkpoints 2>/dev/null
ls -la "$out"
$PY benchmarks/bench_generator.py --table-only --out "$out/generator" --symmetry "$SYM" --summary-dir "$out" \
    --n-samples "${N_SAMPLES:-100000}" --note "${NOTE:-lent GPU machine (device tool), 16 CPU cores}" | tail -60
