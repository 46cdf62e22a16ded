#!/usr/bin/env bash
# Check the CUDA path on one GPU before a long job: the GPU tests (tests/test_cuda.py: NCCL
# world, fused and CUDA-graphed decode against Megatron's forward, train and resume), the
# three-stage pipeline on the tiny built-in default, and the rollout benchmark with HF
# generate() on the same GPU. Each part has a time limit and a log of its own; a failing part
# does not stop the others. The summary (part, exit status, seconds) is OUT/summary.txt.
#
#   bash tools/cuda_check.sh OUT [WORK]
#
# OUT gets the logs and the pipeline's report.json (small files); WORK (default
# /tmp/cuda_check) the pipeline's runs and checkpoints. Needs the project's dependencies
# importable by $PYTHON (default python3). Of Transformer Engine it checks only per-document
# attention on packed sequences (where TE imports), not FP8: the tiny recipes use Megatron-Core's
# local layers; run a recipe with model.fp8 for that.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash tools/cuda_check.sh OUT [WORK]}
work=${2:-/tmp/cuda_check}
py=${PYTHON:-python3}
mkdir -p "$out" "$work" || exit 1
export PYTHONUNBUFFERED=1 FORESIGHT_DEBUG=1

part() {  # part NAME SECONDS COMMAND...: run it with a limit, log to OUT/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (at most $limit s): $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    tail -n 5 "$out/$name.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import torch, megatron.core as mc; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'megatron-core', mc.__version__, torch.cuda.get_device_name(0))"
    "$py" -c "import transformer_engine as te; print('transformer_engine', te.__version__)" \
        || echo "transformer_engine: not importable (the local layer spec is used)"
    lscpu | grep -E "Model name|^CPU\(s\)"
} > "$out/env.log" 2>&1
cat "$out/env.log"

part tests "${TESTS_S:-150}" "$py" -m pytest -p no:cacheprovider -q -rA tests/test_cuda.py
part pipeline "${PIPELINE_S:-270}" "$py" -m megatron_foresight pipeline recipes/tiny-cpu \
    --run-dir "$work/pipeline"
cp "$work/pipeline/report.json" "$out/" 2>/dev/null
part rollout "${ROLLOUT_S:-300}" "$py" benchmarks/rollout_throughput.py --repeats 1 \
    --tables "${ROLLOUT_TABLES:-single,group}" --policy "$work/pipeline/fc_rl" \
    --scratch "$work/benchmark"
