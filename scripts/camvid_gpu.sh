#!/usr/bin/env bash
# The README's CamVid table on one GPU (weights + data copied to .assets/, see README).
#   bash scripts/camvid_gpu.sh dense   OUT   # dense baseline + DToP@Direct sweep
#   bash scripts/camvid_gpu.sh tuned   OUT   # DToP@Finetune at chosen ξ + DoViT (needs the dense run)
#   bash scripts/camvid_gpu.sh atm     OUT   # ATM heads: dense baseline, Direct ξ sweep, Finetune at ξ=$ATM_THR
#   bash scripts/camvid_gpu.sh speed   OUT   # images/s (bf16) of the ξ=0.99 finetuned model on val images (needs tuned)
#   bash scripts/camvid_gpu.sh evalspeed OUT # dense training (STEPS, default 3000), then dtop-eval's images/s
#                                            # dense (ξ=1) vs DToP@Direct (ξ=$EVAL_THR), CUDA graphs on/off, batch 1/16
#   bash scripts/camvid_gpu.sh trainspeed OUT # dtop-train's own throughput (metrics.json train_speed), TRAIN_STEPS
#                                            # steps from the dense checkpoint: dense (ξ=1) vs DToP@Finetune (ξ=$EVAL_THR)
set -uo pipefail
stage=$1; out=$2; mkdir -p "$out"
A=.assets
paths=(data.root=$A/camvid model.backbone.weights=$A/dinov2_vits14.safetensors logger=csv)
dense_dir=logs/camvid/dense
ck=$dense_dir/checkpoints/best.ckpt
if [ "$stage" = dense ]; then
  python -m dtop.cli.train experiment=camvid_dense_fcn "${paths[@]}" hydra.run.dir=$dense_dir > "$out/dense.log" 2>&1 || { tail -30 "$out/dense.log"; exit 1; }
  python -m dtop.cli.evaluate -m experiment=camvid_dtop_fcn "${paths[@]}" ckpt_path=$ck \
    model.pruning.threshold=0.8,0.9,0.95,0.98 hydra.sweep.dir=logs/camvid/direct > "$out/direct.log" 2>&1 || tail -30 "$out/direct.log"
fi
if [ "$stage" = tuned ]; then
  for thr in ${THRESHOLDS:-0.9 0.95}; do
    python -m dtop.cli.train experiment=camvid_dtop_fcn "${paths[@]}" module.init_ckpt=$ck model.pruning.threshold=$thr \
      hydra.run.dir=logs/camvid/finetune_$thr > "$out/finetune_$thr.log" 2>&1 || tail -30 "$out/finetune_$thr.log"
  done
  python -m dtop.cli.train experiment=camvid_dovit_fcn "${paths[@]}" teacher_ckpt=$ck model.pruning.threshold=${DOVIT_THR:-0.95} \
    hydra.run.dir=logs/camvid/dovit > "$out/dovit.log" 2>&1 || tail -30 "$out/dovit.log"
fi
if [ "$stage" = atm ]; then
  atm_dir=logs/camvid/atm_dense
  python -m dtop.cli.train experiment=camvid_dense_atm "${paths[@]}" hydra.run.dir=$atm_dir > "$out/atm_dense.log" 2>&1 || { tail -30 "$out/atm_dense.log"; exit 1; }
  python -m dtop.cli.evaluate -m experiment=camvid_dense_atm "${paths[@]}" ckpt_path=$atm_dir/checkpoints/best.ckpt \
    model.pruning.threshold=0.9,0.95,0.98 hydra.sweep.dir=logs/camvid/atm_direct > "$out/atm_direct.log" 2>&1 || tail -30 "$out/atm_direct.log"
  python -m dtop.cli.train experiment=camvid_dense_atm "${paths[@]}" module.init_ckpt=$atm_dir/checkpoints/best.ckpt \
    model.pruning.threshold=${ATM_THR:-0.95} trainer.max_steps=1000 trainer.val_check_interval=500 module.warmup_iters=50 \
    eval_dense=true hydra.run.dir=logs/camvid/atm_finetune > "$out/atm_finetune.log" 2>&1 || tail -30 "$out/atm_finetune.log"
fi
if [ "$stage" = evalspeed ]; then
  python -m dtop.cli.train experiment=camvid_dense_fcn "${paths[@]}" trainer.max_steps=${STEPS:-3000} trainer.val_check_interval=${STEPS:-3000} \
    hydra.run.dir=$dense_dir > "$out/dense.log" 2>&1 || { tail -30 "$out/dense.log"; exit 1; }
  for bs in 1 16; do
    for g in ${GRAPHS:-true false}; do
      for thr in 1.0 ${EVAL_THR:-0.98}; do
        d=logs/camvid/evalspeed/xi${thr}_graphs-${g}_b$bs
        python -m dtop.cli.evaluate ckpt_path=$ck "${paths[@]}" trainer=gpu model.pruning.threshold=$thr module.cuda_graphs=$g \
          data.val_batch_size=$bs hydra.run.dir=$d > "$out/evalspeed.log" 2>&1 || tail -30 "$out/evalspeed.log"
        python -c "import json,sys; m=json.load(open('$d/metrics.json')); print(json.dumps({'xi': $thr, 'cuda_graphs': '$g', \
          'batch': $bs, **{k: m.get(k) for k in ('mIoU', 'images_per_s', 'images_per_s_wall', 'graphs_captured', 'gmacs',
          'keep_ratio_per_stage')}}))" \
          >> "$out/camvid_evalspeed.jsonl" 2>/dev/null
      done
    done
  done
  cat "$out/camvid_evalspeed.jsonl"
  b=(experiment=camvid_dtop_fcn ckpt_path=$ck model.pruning.threshold=${EVAL_THR:-0.98} "${paths[@]}" dtype=bf16
     train_step=false input_size=[364,476] cuda_graphs=true compile_dense=true)
  for bs in 16 1; do
    python -m dtop.cli.bench "${b[@]}" batch_size=$bs iters=40 hydra.run.dir=logs/camvid/bench_$bs \
      2>&1 | tail -1 >> "$out/camvid_bench.jsonl"
  done
fi
if [ "$stage" = trainspeed ]; then
  for thr in 1.0 ${EVAL_THR:-0.98}; do
    d=logs/camvid/trainspeed/xi$thr
    python -m dtop.cli.train experiment=camvid_dtop_fcn "${paths[@]}" module.init_ckpt=$ck model.pruning.threshold=$thr \
      trainer.max_steps=${TRAIN_STEPS:-300} trainer.val_check_interval=${TRAIN_STEPS:-300} eval_dense=false \
      hydra.run.dir=$d > "$out/trainspeed.log" 2>&1 || tail -30 "$out/trainspeed.log"
    python -c "import json; m=json.load(open('$d/metrics.json')); print(json.dumps({'xi': $thr, \
      **{k: m.get(k) for k in ('train_speed', 'mIoU', 'keep_ratio_per_stage')}}))" >> "$out/camvid_trainspeed.jsonl"
  done
  cat "$out/camvid_trainspeed.jsonl"
fi
if [ "$stage" = speed ]; then
  b=(experiment=camvid_dtop_fcn ckpt_path=logs/camvid/finetune_0.99/checkpoints/best.ckpt model.pruning.threshold=0.99
     "${paths[@]}" dtype=bf16 train_step=false input_size=[364,476])
  for g in false true; do
    for bs in 16 1; do
      python -m dtop.cli.bench "${b[@]}" batch_size=$bs iters=40 cuda_graphs=$g hydra.run.dir=logs/camvid/bench_${bs}_$g \
        2>&1 | tail -1 >> "$out/camvid_bench.jsonl"
    done
  done
fi
python - "$out" <<'PY'
import json, pathlib, sys
rows = {}
for f in sorted(pathlib.Path("logs/camvid").rglob("metrics.json")):
    m = json.loads(f.read_text()); m.pop("config", None); m.pop("per_class_IoU", None); m.pop("per_class_Acc", None)
    rows[str(f.parent.relative_to("logs/camvid"))] = m
pathlib.Path(sys.argv[1], "camvid_summary.json").write_text(json.dumps(rows, indent=1))
for k, m in rows.items():
    print(k, {x: m.get(x) for x in ("threshold", "mIoU", "gmacs", "gmacs_linear", "gmacs_dense", "keep_ratio_per_stage", "tokens_per_stage", "dense")})
PY
