#!/usr/bin/env bash
# The campaign's GPU rates (issue 16) on a lent GPU machine (device tool: torch, torch_geometric
# and CUDA installed, nothing downloadable). Carried from here (git-ignored):
#   .whl/       cp312 manylinux wheels: pymatgen, pymatgen-core, monty, ruamel.yaml(+clib), orjson,
#               palettable, uncertainties, bibtexparser, spglib, matgl, ase, phonopy, phonors, symfc,
#               polars 1.30 (polars 2's runtime is over the 64 MiB carry limit)
#   .devcarry/  models/M3GNet-MP-2021.2.8-PES (from $CGWGAN_SHARED/models),
#               data/campaign_candidates.parquet + campaign_training_x.npy
#               (bench_campaign.py --export-sample .devcarry/data)
# Measures with bench_campaign.py --device-rates: prescreen rate at several batch sizes on the real
# candidates then in passes for PRESCREEN_S seconds, WGAN training epochs, relax_frame on the lowest
# RELAX_N, phonon screens of the lowest PHONON_N converged; BUDGET_S bounds the whole (stages that
# would not fit are skipped). Writes $OUT/campaign_gpu.json
# (after every stage, so a time-out keeps what was measured) and $OUT/gpu_campaign.log.
# PROCS="4 8" (with SKIP_MAIN=1 to skip the above): the pre-screen in P concurrent processes.
# Dry run on a CPU here: SKIP_INSTALL=1 PY=.venv/bin/python DEVICE=cpu BUDGET_S=120 PRESCREEN_S=10 \
#   RELAX_N=4 PHONON_N=1 SWEEP_ROWS=64 BATCHES=16,32 EPOCHS=1 OUT=/tmp/gpu_dry bash benchmarks/gpu_campaign.sh
set -uo pipefail
out=${OUT:-/tmp/gpu_campaign}
mkdir -p "$out"
PY=${PY:-python3}
# CODE_DIR: a copy of lib/ + benchmarks/ taken when it was known to work (default: this checkout)
CODE=$(cd "${CODE_DIR:-.}" && pwd)
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    t0=$(date +%s)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$CODE
    echo "wheels installed in $(( $(date +%s) - t0 )) s"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
else
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$CODE
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
$PY -c "import torch, matgl, pymatgen.core, ase, phonopy, polars
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'matgl', matgl.__version__, 'polars', polars.__version__)" || exit 1
if [ "${SKIP_MAIN:-0}" != 1 ]; then
$PY "$CODE/benchmarks/bench_campaign.py" --device-rates --device "${DEVICE:-cuda}" \
    --models-dir "${MODELS_DIR:-.devcarry/models}" --sample-dir "${SAMPLE_DIR:-.devcarry/data}" --gpu-out "$out/campaign_gpu.json" \
    --budget-s "${BUDGET_S:-300}" --prescreen-seconds "${PRESCREEN_S:-120}" --sweep-rows "${SWEEP_ROWS:-4096}" \
    --gpu-batch-sizes "${BATCHES:-64,128,256,512}" --relax "${RELAX_N:-128}" --relax-batch-size "${RELAX_BATCH:-128}" \
    --phonons "${PHONON_N:-48}" --phonon-batch-size "${PHONON_BATCH:-64}" --gpu-epochs "${EPOCHS:-20}" \
    2>&1 | grep --line-buffered -v -i "warn" | tee "$out/gpu_campaign.log"
fi
# PROCS="4 8": the pre-screen in P processes sharing the GPU (as P Ray actors would), each with
# 16/P torch threads, PROCS_S seconds of passes each; summed into $OUT/campaign_gpu_processes.json.
if [ -n "${PROCS:-}" ]; then
    tmp=$(mktemp -d)
    for p in $PROCS; do
        for i in $(seq 1 "$p"); do
            OMP_NUM_THREADS=$(( ${NCORES:-16} / p > 0 ? ${NCORES:-16} / p : 1 )) \
            $PY "$CODE/benchmarks/bench_campaign.py" --device-rates --only-prescreen --device "${DEVICE:-cuda}" \
                --models-dir "${MODELS_DIR:-.devcarry/models}" --sample-dir "${SAMPLE_DIR:-.devcarry/data}" \
                --gpu-out "$tmp/actors_${p}_$i.json" --budget-s 600 --prescreen-seconds "${PROCS_S:-60}" \
                --sweep-rows 1024 --gpu-batch-sizes "${PROCS_BATCH:-128}" > "$tmp/actors_${p}_$i.log" 2>&1 &
        done
        wait
        echo "[procs] $p done"; grep -h "prescreen:" "$tmp"/actors_"${p}"_*.log
    done
    $PY "$CODE/benchmarks/bench_campaign.py" --aggregate-processes "$tmp" --gpu-out "$out/campaign_gpu_processes.json"
fi
