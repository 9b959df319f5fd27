#!/usr/bin/env bash
# The GPU benchmark table of the README: dense vs pruned, bf16, ViT-B and ViT-L with FCN heads.
# Usage: bash scripts/bench_gpu.sh OUT_DIR [extra hydra overrides...]
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
run vitb_512_b1 "${vitb[@]}" batch_size=1 input_size=[512,512] model.backbone.img_size=[512,512] iters=100 warmup=20
run vitb_512_b1_graphs "${vitb[@]}" batch_size=1 input_size=[512,512] model.backbone.img_size=[512,512] iters=100 warmup=20 cuda_graphs=true train_step=false
run vitb_512_b8_graphs "${vitb[@]}" batch_size=8 input_size=[512,512] model.backbone.img_size=[512,512] iters=40 cuda_graphs=true train_step=false
run vitb_512_b8 "${vitb[@]}" batch_size=8 input_size=[512,512] model.backbone.img_size=[512,512] iters=40
run vitb_512_b32 "${vitb[@]}" batch_size=32 input_size=[512,512] model.backbone.img_size=[512,512] iters=20
run vitl_512_b8 "${vitl[@]}" batch_size=8 input_size=[512,512] model.backbone.img_size=[512,512] iters=20
run vitl_512_b8_graphs "${vitl[@]}" batch_size=8 input_size=[512,512] model.backbone.img_size=[512,512] iters=20 cuda_graphs=true train_step=false
run vitl_512_b32 "${vitl[@]}" batch_size=32 input_size=[512,512] model.backbone.img_size=[512,512] iters=10 train_step=false
run vitl_1024x2048_b1 "${vitl[@]}" batch_size=1 input_size=[1024,2048] model.backbone.img_size=[1024,2048] iters=10 train_step=false
run vitl_1024x2048_b2 "${vitl[@]}" batch_size=2 input_size=[1024,2048] model.backbone.img_size=[1024,2048] iters=10 train_step=false
python - "$out" <<'PY'
import json, sys, pathlib
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        r = json.loads(f.read_text())
    except json.JSONDecodeError:
        continue
    i, t = r["inference"], r.get("train", {})
    rows.append(f"| {r['backbone']} | {r['input_size'][0]}×{r['input_size'][1]} | {r['batch_size']} | {'graphs' if r.get('cuda_graphs') else 'eager'} | {i['dense_ms']:.2f} | "
                f"{i['pruned_ms']:.2f} | {i['gmacs_ratio']:.3f} | {i['time_ratio']:.3f} | **{i['efficiency']:.2f}** | "
                f"{i['dense_peak_mib']:.0f} / {i['pruned_peak_mib']:.0f} | "
                + (f"{t['dense_ms']:.1f} / {t['pruned_ms']:.1f} (×{t['speedup']:.2f}) | {t['dense_peak_mib']:.0f} / {t['pruned_peak_mib']:.0f} |" if t else "– | – |"))
print("| backbone | input | batch | mode | dense ms | pruned ms | GMACs ratio | time ratio | efficiency | peak MiB d/p | train ms d/p | train MiB d/p |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
PY
