#!/usr/bin/env bash
# The GPU benchmark table of the README: dense vs pruned, bf16, ViT-B and ViT-L with FCN heads.
# Usage: [MODES="eager graphs" (MODES= for training only)] [TRAIN=1] bash scripts/bench_gpu.sh OUT_DIR [extra hydra overrides...]
set -uo pipefail
out=${1:-bench_out}; shift || true
mkdir -p "$out"
common=(dtype=bf16 data.num_classes=150 ~model.backbone.depth "$@")
vitb=(model.backbone.name=vit_base_patch16_224 model.prune_layers=[6,8])
vitl=(model.backbone.name=vit_large_patch16_224 model.prune_layers=[8,16])
run() {
  local name=$1; shift
  python -m dtop.cli.bench "${common[@]}" "$@" hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1 \
    && tail -n 1 "$out/$name.log" > "$out/$name.json" || { echo "FAILED $name"; tail -n 20 "$out/$name.log"; }
}
b512=(input_size=[512,512] model.backbone.img_size=[512,512] train_step=false)
big=(input_size=[1024,2048] model.backbone.img_size=[1024,2048] train_step=false iters=10)
for mode in ${MODES-eager graphs}; do
  g=(); [ $mode = graphs ] && g=(cuda_graphs=true)
  run vitb_512_b1_$mode "${vitb[@]}" "${b512[@]}" "${g[@]}" batch_size=1 iters=100 warmup=20
  run vitl_512_b1_$mode "${vitl[@]}" "${b512[@]}" "${g[@]}" batch_size=1 iters=50 warmup=10
  run vitb_512_b8_$mode "${vitb[@]}" "${b512[@]}" "${g[@]}" batch_size=8 iters=40
  run vitb_512_b32_$mode "${vitb[@]}" "${b512[@]}" "${g[@]}" batch_size=32 iters=20
  run vitl_512_b8_$mode "${vitl[@]}" "${b512[@]}" "${g[@]}" batch_size=8 iters=20
  run vitl_512_b32_$mode "${vitl[@]}" "${b512[@]}" "${g[@]}" batch_size=32 iters=10
  run vitl_1024x2048_b1_$mode "${vitl[@]}" "${big[@]}" "${g[@]}" batch_size=1
  run vitl_1024x2048_b2_$mode "${vitl[@]}" "${big[@]}" "${g[@]}" batch_size=2
done
# training step at a schedule that cuts ~35 % of the GMACs (keep 40 % after layer 6, 25 % after 8)
[ "${TRAIN:-1}" = 1 ] && {
run vitb_512_b8_train "${vitb[@]}" input_size=[512,512] model.backbone.img_size=[512,512] batch_size=8 iters=20 keep=[0.4,0.25] keep_spread=0.1
run vitb_512_b32_train "${vitb[@]}" input_size=[512,512] model.backbone.img_size=[512,512] batch_size=32 iters=10 keep=[0.4,0.25] keep_spread=0.1
# ViT-L: keep 55 % after layer 8, 40 % after 16 (~35 % of the GMACs cut)
run vitl_512_b8_train "${vitl[@]}" input_size=[512,512] model.backbone.img_size=[512,512] batch_size=8 iters=10 keep=[0.55,0.4] keep_spread=0.1
run vitl_512_b16_train "${vitl[@]}" input_size=[512,512] model.backbone.img_size=[512,512] batch_size=16 iters=10 keep=[0.55,0.4] keep_spread=0.1
run vitl_512_b32_train "${vitl[@]}" input_size=[512,512] model.backbone.img_size=[512,512] batch_size=32 iters=8 warmup=3 keep=[0.55,0.4] keep_spread=0.1
run vitb_512_b64_train "${vitb[@]}" input_size=[512,512] model.backbone.img_size=[512,512] batch_size=64 iters=8 warmup=3 keep=[0.4,0.25] keep_spread=0.1
}
python - "$out" <<'PY'
import json, sys, pathlib
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        r = json.loads(f.read_text())
    except json.JSONDecodeError:
        continue
    i, t = r["inference"], r.get("train", {})
    rows.append(f"| {r['backbone']} | {r['input_size'][0]}×{r['input_size'][1]} | {r['batch_size']} | {'graphs' if r.get('cuda_graphs') else 'eager'}, {r.get('precision', 'mixed')} | {i['dense_ms']:.2f} | "
                f"{i['pruned_ms']:.2f} | {i['gmacs_ratio']:.3f} | {i['time_ratio']:.3f} | **{i['efficiency']:.2f}** | "
                + (f"{i['forward_dense_ms']:.2f} / {i['forward_pruned_ms']:.2f} (**{i['forward_efficiency']:.2f}**) | " if 'forward_efficiency' in i else "– | ")
                + f"{i['dense_peak_mib']:.0f} / {i['pruned_peak_mib']:.0f} | "
                + (f"{t['dense_ms']:.1f} / {t['pruned_ms']:.1f} (×{t['speedup']:.2f}) | {t['dense_peak_mib']:.0f} / {t['pruned_peak_mib']:.0f} |" if t else "– | – |"))
print("| backbone | input | batch | mode | dense ms | pruned ms | GMACs ratio | time ratio | efficiency | forward ms d/p (efficiency) | peak MiB d/p | train ms d/p | train MiB d/p |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
PY
