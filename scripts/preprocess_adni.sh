#!/usr/bin/env bash
# Preprocess an ADNI download (the folder holding ADNI/ and the IDA collection CSV) with the ADNI config.
#   scripts/preprocess_adni.sh /data/ADNI_download /data/adni_preprocessed [extra medldm preprocess options]
set -euo pipefail
IN=${1:?ADNI download folder}; OUT=${2:?output dataset folder}; shift 2
exec medldm preprocess "$IN" "$OUT" --config "$(dirname "$0")/../configs/preprocess/adni.yaml" \
  --workers "${WORKERS:-$(nproc)}" "$@"
