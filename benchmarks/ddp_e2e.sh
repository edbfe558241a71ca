#!/usr/bin/env bash
# On the lent 2-GPU machine (device kind nvidia-h100-x2, carry: [".carry"]): the default task on 1
# and on 2 GPUs through the workflow (benchmarks/configs/ddp.yaml), then the loss curves compared.
# The two training jobs run one after the other (--resources gpu=2), as on a 2-GPU workstation.
set -uo pipefail
mkdir -p /tmp/site
for t in site smk extra; do tar xzf .carry/$t.tgz -C /tmp/site; done
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
# NVLink multicast stays off (the lent machine's rule; a program with its own env must keep it).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m snakemake --cores 16 --resources gpu=2 --configfile benchmarks/configs/ddp.yaml -k \
  results-ddp/qwen-1gpu/metrics.json results-ddp/qwen-2gpu/metrics.json > "$OUT/snakemake.log" 2>&1
rc=$?
tail -5 "$OUT/snakemake.log"
for e in qwen-1gpu qwen-2gpu; do
  mkdir -p "$OUT/$e"
  cp results-ddp/$e/{train_log.jsonl,train_summary.json,metrics.json,merge_report.json} "$OUT/$e/" 2>/dev/null
  cp results-ddp/logs/train/$e.log "$OUT/$e/train.log" 2>/dev/null
done
python3 benchmarks/train_ddp.py --out "$OUT" --curves results-ddp/qwen-1gpu results-ddp/qwen-2gpu || rc=1
exit $rc
