#!/usr/bin/env bash
# Behaviour digest: train the demo's three ViT families for a few steps, certify each
# (global and local) and attack each with the certificate audit on, then print one sha256
# per output with the fields that legitimately vary (timings, versions, paths) removed.
# Run before and after a refactoring: identical digests mean identical behaviour.
#   bash scripts/behaviour_digest.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-runs/behaviour-digest}"
L=.venv/bin/lipcert
export OMP_NUM_THREADS=1
rm -rf "$OUT"
for p in vit-mnist-lipschitz vit-mnist-standard vit-mnist-certified; do
    r="$OUT/$p"
    $L train --preset "$p" --steps 30 --out "$r" --quiet >/dev/null
    $L certify "$r" --n 100 --eps 0.01,0.1,0.5 -o "$r/cert-global.json" >/dev/null
    $L certify "$r" --n 30 --eps 0.01,0.1,0.5 --mode local --no-lower -o "$r/cert-local.json" >/dev/null
    $L attack "$r" --data mnist --attacks fgsm,pgdl2 --eps-l2 0.1,0.5 --eps-linf 0.05 --n 30 \
        --certificate "$r/cert-local.json" --audit-radius --audit-steps 10 --audit-restarts 1 \
        --quiet -o "$r/attacks.csv" >/dev/null || true
done
.venv/bin/python - "$OUT" <<'PY'
import hashlib, json, sys
from pathlib import Path

VARYING = {"seconds", "time", "timings", "versions", "elapsed", "created", "path", "model_path",
           "wall_s", "elapsed_s", "lower", "lower_bound", "lower_seconds",
           "source", "ratio", "lower_search"}

def scrub(x):
    if isinstance(x, dict):
        return {k: scrub(v) for k, v in x.items()
                if k not in VARYING and not k.endswith(("_s", "_seconds", "time"))}
    if isinstance(x, list):
        return [scrub(v) for v in x]
    return x

for f in sorted(Path(sys.argv[1]).rglob("*")):
    if f.suffix == ".json":
        data = json.dumps(scrub(json.loads(f.read_text())), sort_keys=True).encode()
    elif f.suffix in (".csv", ".safetensors"):
        data = f.read_bytes()
        if f.name == "train_log.csv":  # drop the elapsed-time column
            rows = [r.split(",") for r in f.read_text().splitlines()]
            i = rows[0].index("elapsed_s") if "elapsed_s" in rows[0] else None
            data = "\n".join(",".join(c for j, c in enumerate(r) if j != i) for r in rows).encode()
    else:
        continue
    print(hashlib.sha256(data).hexdigest()[:16], f.relative_to(sys.argv[1]))
PY
