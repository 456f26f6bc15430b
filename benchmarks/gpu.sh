#!/usr/bin/env bash
# GPU figures for docs/benchmarks.md (issue 25, item 5); never needed by the tests. Run on a machine with a CUDA GPU,
# from the repository root, after installing the torch build for its CUDA and the package:
#
#     bash benchmarks/gpu.sh [OUT_FOLDER]      # default benchmarks/results/gpu
#
# 1. training: the paper preset at 128 px (and the tiny one at 64 px): steps per second and peak GPU memory;
# 2. segment: seconds per volume with the bundled model, at the paper's exact setting (N = 600, k = 1) and at the
#    calibrated fast one, at the batch size the model picks from free GPU memory;
# 3. the loader's share: the same cohort with 0 (loading and writing between cases) and with 3 loader/writer
#    processes: (seconds with 0 - seconds with 3) / seconds with 0 is the time loading and writing cost the GPU.
# Each step writes its JSON to OUT_FOLDER; the card's name is printed first (nvidia-smi) and recorded by each step.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.csv"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script measures a GPU'; print(torch.cuda.get_device_name(0))"
batch=$(python -c "from anofpdm_monai.model import AnoFPDMModel; print(AnoFPDMModel.from_folder('bundled', 'cuda').default_batch_size())")
echo "segment batch size from free GPU memory: $batch"
python benchmarks/train_throughput.py --device cuda --presets tiny,paper --image-sizes 64,128 --steps 20 --warmup 3 \
    --out "$out/train_throughput.json"
python benchmarks/segment_throughput.py --device cuda --cases 4 --workers 0 --steps 600 --stride 1 --batch-size "$batch" \
    --out "$out/segment_paper_setting.json"
python benchmarks/segment_throughput.py --device cuda --cases 10 --workers 0,3 --batch-size "$batch" \
    --out "$out/segment_fast_setting.json"
echo "figures in $out"
