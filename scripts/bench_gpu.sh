#!/usr/bin/env bash
# The GPU speed table (docs/performance.md): dense vs the configured policy, bf16, FCN heads, 150 classes.
# Every pruned number runs the real policy (grading, DToP's top-k context or DoViT's stop/reconstruct/merge)
# on synthetic confidences that give the keep schedule; recorded masks are the ablation column.
# Usage: [SETS="dtop dovit train"] [COMPILE=1] [ONLY=regex] bash scripts/bench_gpu.sh OUT_DIR [extra hydra overrides...]
# ONLY keeps the configurations whose name matches (e.g. ONLY='b1$|dovit').
# Writes OUT_DIR/<name>.json per configuration and OUT_DIR/all.jsonl.
set -uo pipefail
out=${1:-bench_out}; shift || true
mkdir -p "$out"; : > "$out/all.jsonl"
common=(dtype=bf16 data.num_classes=150 ~model.backbone.depth "$@")
vitb=(model.backbone.name=vit_base_patch16_224 model.prune_layers=[6,8])
vitl=(model.backbone.name=vit_large_patch16_224 model.prune_layers=[8,16])
vits=(model.backbone.name=vit_small_patch16_224 model.prune_layers=[6,8])
dovit_b=(model=dovit_fcn_tiny model.backbone.name=vit_base_patch16_224 model.prune_layers=[2,5,8] keep=[0.8,0.6,0.45])
run() {
  local name=$1; shift
  [[ -n "${ONLY:-}" && ! "$name" =~ $ONLY ]] && return
  timeout "${RUN_LIMIT:-240}" python -m dtop.cli.bench "${common[@]}" "$@" hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1 \
    && tail -n 1 "$out/$name.log" > "$out/$name.json" && tail -n 1 "$out/$name.log" >> "$out/all.jsonl" \
    || { echo "FAILED $name"; tail -n 20 "$out/$name.log"; }
}
c=(); [ "${COMPILE:-1}" = 1 ] && c=(compile_dense=true)
g=(cuda_graphs=true train_step=false)
b512=(input_size=[512,512] model.backbone.img_size=[512,512])
big=(input_size=[1024,2048] model.backbone.img_size=[1024,2048] iters=10)
for set in ${SETS-dtop dovit}; do
  if [ "$set" = dtop ]; then
    run dtop_vitb_512_b8 "${vitb[@]}" "${b512[@]}" "${g[@]}" "${c[@]}" batch_size=8 iters=40
    run dtop_vitb_512_b32 "${vitb[@]}" "${b512[@]}" "${g[@]}" batch_size=32 iters=20
    run dtop_vitl_512_b8 "${vitl[@]}" "${b512[@]}" "${g[@]}" batch_size=8 iters=20
    run dtop_vitl_512_b32 "${vitl[@]}" "${b512[@]}" "${g[@]}" batch_size=32 iters=10
    run dtop_vitl_1024x2048_b1 "${vitl[@]}" "${big[@]}" "${g[@]}" batch_size=1
    run dtop_vitb_512_b1 "${vitb[@]}" "${b512[@]}" "${g[@]}" batch_size=1 iters=100 warmup=20
    run dtop_vits_512_b1 "${vits[@]}" "${b512[@]}" "${g[@]}" batch_size=1 iters=100 warmup=20
    run dtop_vitl_512_b1 "${vitl[@]}" "${b512[@]}" "${g[@]}" batch_size=1 iters=50 warmup=10
    run dtop_vitl_1024x2048_b2 "${vitl[@]}" "${big[@]}" "${g[@]}" batch_size=2
    run dtop_vitb_512_b8_eager "${vitb[@]}" "${b512[@]}" train_step=false batch_size=8 iters=20
  fi
  if [ "$set" = dovit ]; then
    run dovit_vitb_512_b8 "${dovit_b[@]}" "${b512[@]}" "${g[@]}" batch_size=8 iters=40
    run dovit_vitb_512_b1 "${dovit_b[@]}" "${b512[@]}" "${g[@]}" batch_size=1 iters=100 warmup=20
    run dovit_vitb_512_b32 "${dovit_b[@]}" "${b512[@]}" "${g[@]}" batch_size=32 iters=20
  fi
  if [ "$set" = train ]; then  # keep schedules that cut ~35 % of the GMACs
    run train_vitb_512_b8 "${vitb[@]}" "${b512[@]}" batch_size=8 iters=20 keep=[0.4,0.25] keep_spread=0.1
    run train_vitb_512_b32 "${vitb[@]}" "${b512[@]}" batch_size=32 iters=10 keep=[0.4,0.25] keep_spread=0.1
  fi
done
python - "$out" <<'PY'
import json, sys, pathlib
print("| config | device | dense ms | compiled dense ms | pruned ms (policy) | recorded ms | GMACs ratio | efficiency | vs fastest dense | train d/p ms |")
print("|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        r = json.loads(f.read_text())
    except json.JSONDecodeError:
        continue
    i, t = r["inference"], r.get("train") or {}
    fmt = lambda v, p=2: "–" if v is None else f"{v:.{p}f}"
    print(f"| {f.stem} | {r['device'].replace('NVIDIA ', '')} | {fmt(i['dense_ms'])} | {fmt(i.get('compiled_dense_ms'))} | "
          f"{fmt(i['pruned_ms'])} | {fmt(i.get('recorded_pruned_ms'))} | {fmt(i['gmacs_ratio'], 3)} | "
          f"**{fmt(i['efficiency'])}** | {fmt(i.get('efficiency_vs_best_dense'))} | "
          + (f"{t['dense_ms']:.1f}/{t['pruned_ms']:.1f} ×{t['speedup']:.2f} |" if t else "– |"))
PY
