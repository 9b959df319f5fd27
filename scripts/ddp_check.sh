#!/usr/bin/env bash
# Multi-GPU check (docs/multi_gpu.md): a short DDP training run, then the same checkpoint evaluated on
# 2 GPUs and on 1 GPU, whose metrics.json and per_image.parquet must agree exactly. ~2-4 minutes.
#
#   bash scripts/ddp_check.sh [OUT_DIR]                    # 2 GPUs (needs no internet)
#   ACCEL=cpu STEPS=10 bash scripts/ddp_check.sh [OUT_DIR] # dry run of the same pipeline on CPU (gloo)
#
# Exit status 0 only if every row of the final table says PASS.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1
out=$(realpath -m "${1:-logs/ddp_check/$(date +%Y-%m-%d_%H-%M-%S)}")
accel=${ACCEL:-gpu}
steps=${STEPS:-50}
limit=${STEP_TIMEOUT:-420}  # seconds per command: a DDP deadlock fails the check instead of hanging it
mkdir -p "$out"

if [ "$accel" = gpu ]; then
  ddp=(trainer=ddp trainer.devices=2 trainer.accelerator=gpu trainer.precision=bf16-mixed)
  one=(trainer=gpu trainer.devices=1 trainer.precision=bf16-mixed)
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
else  # gloo on CPU: no SyncBatchNorm (it needs GPUs)
  ddp=(trainer=ddp trainer.devices=2 trainer.accelerator=cpu trainer.precision=32-true trainer.sync_batchnorm=false)
  one=(trainer=cpu trainer.devices=1 trainer.precision=32-true)
fi
# 101 validation images in batches of 16: 7 batches (the last one partial), 4 on rank 0 and 3 on rank 1.
data=(data.train_size=512 data.batch_size=8 data.val_size=101 data.val_batch_size=16 seed=0)
model=(model.pruning.threshold=0.8)  # low enough that the briefly trained aux heads really prune

run() {  # name, command...
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  timeout -k 20 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc, $((SECONDS - t0)) s, log $out/$name.log"
  if [ $rc -ne 0 ]; then tail -n 40 "$out/$name.log"; fi
  return $rc
}

status=0
run train python -m dtop.cli.train "${ddp[@]}" "${data[@]}" "${model[@]}" \
  trainer.max_steps="$steps" trainer.val_check_interval=$(( (steps + 1) / 2 )) trainer.log_every_n_steps=2 \
  module.warmup_iters=5 logger=csv eval_dense=true hydra.run.dir="$out/train" || status=1
ckpt="$out/train/checkpoints/best.ckpt"
if [ $status -eq 0 ]; then
  run eval_2 python -m dtop.cli.evaluate "${ddp[@]}" "${data[@]}" "${model[@]}" ckpt_path="$ckpt" eval_dense=true \
    hydra.run.dir="$out/eval_2" || status=1
  run eval_1 python -m dtop.cli.evaluate "${one[@]}" "${data[@]}" "${model[@]}" ckpt_path="$ckpt" eval_dense=true \
    hydra.run.dir="$out/eval_1" || status=1
fi

python - "$out" "$status" <<'PY'
import json, math, sys
from pathlib import Path

out, status = Path(sys.argv[1]), int(sys.argv[2])
rows: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    rows.append((name, bool(ok), detail))


check("commands finished (train, eval 2 ranks, eval 1 rank)", status == 0, "see *.log" if status else "")
train = out / "train"
check("train: best.ckpt and last.ckpt written", (train / "checkpoints/best.ckpt").is_file()
      and (train / "checkpoints/last.ckpt").is_file())
check("train: rank 1 ran in rank 0's run dir", (train / "train_ddp_process_1.log").is_file(),
      "hydra log of rank 1 next to rank 0's")
extra = [p.name for p in train.parent.iterdir() if p.is_dir() and p.name not in ("train", "eval_1", "eval_2")]
check("no stray run dirs", not extra, ", ".join(extra))
csv = sorted(train.glob("csv/version_*/metrics.csv"))  # fit, then the post-fit evaluation's trainer
fit_csv = [c for c in csv if "train/loss" in c.read_text().splitlines()[0].split(",")]
if fit_csv:
    import pandas as pd
    m = pd.read_csv(fit_csv[0])
    loss = m["train/loss"].dropna()
    val_images = sorted(set(m["val/images"].dropna().astype(int))) if "val/images" in m else []
    check("train: one logger (rank 0), finite losses, val on all images",
          len(csv) == 2 and len(loss) > 0 and bool(loss.apply(math.isfinite).all()) and val_images == [101],
          f"{len(csv)} csv logs, last step {int(m['step'].max())}, loss {loss.iloc[0]:.3f} → {loss.iloc[-1]:.3f}, "
          f"val/images {val_images}" if len(loss) else f"{len(csv)} csv logs, no train/loss rows")
else:
    check("train: one logger (rank 0), finite losses, val on all images", False, "no csv log of the fit")


def load(name: str):
    d = out / name
    try:
        metrics = json.loads((d / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        return None, None, f"{name}/metrics.json: {err}"
    try:
        import pandas as pd
        table = pd.read_parquet(d / "per_image.parquet")
    except Exception as err:  # noqa: BLE001
        return metrics, None, f"{name}/per_image.parquet: {err}"
    return metrics, table, ""


KEYS = ("mIoU", "aAcc", "mAcc", "images", "gmacs", "gmacs_linear", "tokens_per_stage", "keep_ratio_per_stage")
ref, ref_table, err1 = load("eval_1")
for name, label in (("eval_2", "eval 2 ranks"), ("train", "post-fit eval in train (2 ranks)")):
    got, table, err = load(name)
    if ref is None or got is None:
        check(f"{label}: metrics.json == 1 GPU", False, err1 or err)
        continue
    diff = {k: (got.get(k), ref.get(k)) for k in KEYS if got.get(k) != ref.get(k)}
    for k in ("mIoU", "aAcc", "mAcc", "gmacs"):
        if (got.get("dense") or {}).get(k) != (ref.get("dense") or {}).get(k):
            diff[f"dense.{k}"] = ((got.get("dense") or {}).get(k), (ref.get("dense") or {}).get(k))
    shown = ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items())
    check(f"{label}: metrics.json == 1 GPU", not diff,
          shown or f"mIoU {got['mIoU']} aAcc {got['aAcc']} mAcc {got['mAcc']} images {got['images']} "
                   f"gmacs {got['gmacs']} dense mIoU {got['dense']['mIoU']}")
    if table is None or ref_table is None:
        check(f"{label}: per_image.parquet", False, err or err1)
        continue
    ids, ref_ids = list(table["image_id"]), list(ref_table["image_id"])
    check(f"{label}: per_image ids == 1 GPU, each once", ids == ref_ids and len(set(ids)) == len(ids) == ref["images"],
          f"{len(ids)} rows, {len(set(ids))} unique, 1 GPU {len(ref_ids)}")
    same = list(table.columns) == list(ref_table.columns) and table.equals(ref_table)
    check(f"{label}: per_image values == 1 GPU (bitwise)", same,
          "" if same else f"max |Δ| {float((table.drop(columns='image_id') - ref_table.drop(columns='image_id')).abs().max().max()):.3g}"
          if list(table.columns) == list(ref_table.columns) and ids == ref_ids else "columns or order differ")

w = max(len(r[0]) for r in rows)
print(f"\n{'check':<{w}}  result  detail")
print("-" * (w + 40))
for name, ok, detail in rows:
    print(f"{name:<{w}}  {'PASS' if ok else 'FAIL'}    {detail}")
bad = sum(not ok for _, ok, _ in rows)
print("-" * (w + 40))
print(f"DDP CHECK: {'PASS' if not bad else f'FAIL ({bad} of {len(rows)})'}   outputs in {out}")
sys.exit(1 if bad else 0)
PY
