#!/usr/bin/env bash
# The GPU checks of issue 5 on a lent GPU machine (device tool), where torch, torch_geometric
# and CUDA are installed and nothing can be downloaded. Carried from here (git-ignored):
#   .whl/       cp312 manylinux wheels: pymatgen(-core), monty, ruamel.yaml, orjson, palettable,
#               uncertainties, bibtexparser, spglib, matgl, ase, phonopy, phonors, symfc,
#               polars 1.30 (one 36 MB wheel; polars 2's runtime is 54 MB, over the carry limit)
#   .devcarry/  models/M3GNet-* (from ../shared/models), data/m3gnet_reference,
#               data/mp_sample.csv.gz (1,500 MP-20 rows with 2-32 sites)
# Steps: M3GNet on CUDA against the DGL reference, then bench_surrogates.py --device cuda.
set -uo pipefail
out=${OUT:-benchmarks/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, torch_geometric, matgl, pymatgen.core, ase, phonopy, polars
print('torch', torch.__version__, torch.cuda.get_device_name(0), 'matgl', matgl.__version__, 'polars', polars.__version__)" || exit 1
[ -f "$out/m3gnet_reference_gpu.json" ] || python3 benchmarks/m3gnet_reference_check.py --device cuda --models-dir .devcarry/models \
    --reference-dir .devcarry/data/m3gnet_reference --out "$out/m3gnet_reference_gpu.json" | tail -40
python3 benchmarks/bench_surrogates.py --device cuda --surrogates M3GNet-MP-2021.2.8-PES \
    --models-dir .devcarry/models --mp-file .devcarry/data/mp_sample.csv.gz --no-ray \
    --batch-size-energy 128 --batch-size-efs 64 --n-relax 64 --relax-batch-size 64 \
    --note "lent GPU machine (device tool), 16 CPU cores" --out "$out/bench_surrogates_gpu" 2>&1 | tail -70
