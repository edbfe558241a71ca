#!/usr/bin/env bash
# On the lent GPU machine (device tool, carry: [".carry"]): unpack the carried packages, run the
# GPU config's experiments named in $@ (default: all), and leave logs and metrics under $OUT.
set -uo pipefail
mkdir -p /tmp/site && tar xzf .carry/site.tgz -C /tmp/site && tar xzf .carry/smk.tgz -C /tmp/site
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
targets=()
for exp in "${@:-smol-hf smol-unsloth qwen-hf qwen-unsloth}"; do
  for e in $exp; do targets+=("results-gpu/$e/metrics.json"); done
done
python3 -m snakemake --cores 16 --configfile benchmarks/configs/gpu_e2e.yaml -k "${targets[@]}" \
  > "$OUT/snakemake.log" 2>&1
rc=$?
tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='*.arrow' --exclude='checkpoints' \
  --exclude='*.parquet' results-gpu 2>/dev/null
tail -5 "$OUT/snakemake.log"
for f in results-gpu/*/metrics.json; do echo "$f"; python3 -c "import json,sys; m=json.load(open('$f')); print({k: round(m[k]['loss'],4) for k in ('base','tuned','adapter_4bit') if k in m})"; done
exit $rc
