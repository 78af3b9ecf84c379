#!/usr/bin/env bash
# Spark GPU discovery: prints the GPUs of this node as {"name": "gpu", "addresses": ["0", ...]}.
# Honours CUDA_VISIBLE_DEVICES when the node's scheduler has already narrowed the set.
set -euo pipefail
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  # Spark hands these addresses to torch, which numbers the visible devices from 0.
  n=$(echo "$CUDA_VISIBLE_DEVICES" | tr "," "\n" | grep -c .)
  ids=$(seq -s, 0 $((n - 1)))
else
  ids=$(nvidia-smi --query-gpu=index --format=csv,noheader | tr -d ' ' | paste -sd, -)
fi
echo "{\"name\": \"gpu\", \"addresses\": [$(echo "$ids" | sed 's/[^,][^,]*/"&"/g')]}"
