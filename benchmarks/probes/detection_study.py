"""Convergence trials behind the digit-canvas detection default (scripts/train_detection.py DIGITS_RECIPE).

One process, one thread, global batch 16 in that process (what two processes of batch 8 compute per step), the
digits classifier of scripts/train.py as the backbone, fixed held-out canvases from the held-out digits; prints
mAP@50/mAP (torchmetrics, pycocotools) every --eval_every seconds of training time (evaluation excluded). Trials were
run two at a time on the shared 2-core machine; the logs beside this file (detection_study.log) are what they printed.
Usage: PYTHONPATH=. python benchmarks/probes/detection_study.py --detector deformable_detr --canvas 96 --freeze 2 ...
"""

import argparse
import json
import time

import numpy as np
import torch

from modeling_pvt import PvtBackbone
from modeling_pvt.data.digit_canvases import CanvasSpec, DigitCanvases, load_digit_scans
from modeling_pvt.tasks.detection_evaluation import DetectionEvaluator, box_xywh_to_xyxy
from modeling_pvt.tasks.detectors import (
    build_detector,
    build_detector_config,
    build_image_processor,
    find_pvt_backbone,
)

p = argparse.ArgumentParser()
p.add_argument("--detector", default="rt_detr")
p.add_argument("--canvas", type=int, default=128)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--lr", type=float, default=2e-4)
p.add_argument("--lr_backbone", type=float, default=5e-5)
p.add_argument("--freeze", type=int, default=1)
p.add_argument("--queries", type=int, default=30)
p.add_argument("--minutes", type=float, default=8)
p.add_argument("--eval_every", type=float, default=60)
p.add_argument("--d_model", type=int, default=128)
p.add_argument("--dec_layers", type=int, default=3)
p.add_argument("--denoising", type=int, default=40)
p.add_argument("--max_digits", type=int, default=4)
p.add_argument("--min_size", type=int, default=0)
p.add_argument("--max_size", type=int, default=0)
p.add_argument("--warmup", type=int, default=30)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--scratch", action="store_true")
p.add_argument("--tag", default="")
p.add_argument("--backbone", default="pvt-digits")
p.add_argument("--aux", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

(ts, tl), (vs, vl) = load_digit_scans()
spec = CanvasSpec(
    canvas_size=a.canvas,
    max_digits=a.max_digits,
    min_digit_size=a.min_size or a.canvas * 3 // 16,
    max_digit_size=a.max_size or a.canvas * 3 // 8,
)
train = DigitCanvases(ts, tl, 10**6, spec, 1, False)
val = DigitCanvases(vs, vl, 200, spec, 2, True)
bb = PvtBackbone.from_pretrained(a.backbone)
kw = {
    "rt_detr": dict(
        d_model=a.d_model,
        encoder_hidden_dim=a.d_model,
        encoder_ffn_dim=4 * a.d_model,
        decoder_ffn_dim=4 * a.d_model,
        decoder_layers=a.dec_layers,
        num_queries=a.queries,
        num_denoising=a.denoising,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        decoder_in_channels=[a.d_model] * 3,
    ),
    "deformable_detr": dict(
        d_model=a.d_model,
        encoder_layers=2,
        decoder_layers=a.dec_layers,
        encoder_ffn_dim=4 * a.d_model,
        decoder_ffn_dim=4 * a.d_model,
        num_queries=a.queries,
        two_stage=True,
        with_box_refine=True,
        two_stage_num_proposals=a.queries,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
    ),
    "conditional_detr": dict(
        d_model=a.d_model,
        encoder_layers=2,
        decoder_layers=a.dec_layers,
        encoder_ffn_dim=4 * a.d_model,
        decoder_ffn_dim=4 * a.d_model,
        num_queries=a.queries,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
    ),
}[a.detector]
if a.aux:
    kw["auxiliary_loss"] = True
cfg = build_detector_config(a.detector, bb.config, {i: str(i) for i in range(10)}, **kw)
model = build_detector(a.detector, cfg, None if a.scratch else bb)
proc = build_image_processor(a.detector, {"height": a.canvas, "width": a.canvas})
pb = find_pvt_backbone(model)
for n, q in pb.named_parameters():
    if any(f"embeddings.{i}." in n or f"block.{i}." in n for i in range(a.freeze)):
        q.requires_grad_(False)
bbp = {id(q) for q in pb.parameters()}
groups = [
    {"params": [q for q in model.parameters() if id(q) in bbp and q.requires_grad], "lr": a.lr_backbone},
    {"params": [q for q in model.parameters() if id(q) not in bbp], "lr": a.lr},
]
opt = torch.optim.AdamW(groups, weight_decay=1e-4)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup))


def batch_of(samples):
    ann = [
        {
            "image_id": s.image_id,
            "annotations": [
                {"bbox": b.tolist(), "category_id": int(c), "area": float(b[2] * b[3]), "iscrowd": 0}
                for b, c in zip(s.boxes, s.categories)
            ],
        }
        for s in samples
    ]
    return proc(images=[s.image for s in samples], annotations=ann, return_tensors="pt")


vsamples = [val.sample(i) for i in range(len(val))]


def evaluate():
    model.eval()
    ev = DetectionEvaluator(cfg.id2label)
    with torch.no_grad():
        for i in range(0, len(vsamples), 50):
            ss = vsamples[i : i + 50]
            enc = batch_of(ss)
            out = model(pixel_values=enc["pixel_values"], pixel_mask=enc.get("pixel_mask"))
            preds = proc.post_process_object_detection(
                out, threshold=0.0, target_sizes=[(a.canvas, a.canvas)] * len(ss)
            )
            ev.update(
                preds,
                [
                    {"boxes": box_xywh_to_xyxy(torch.as_tensor(s.boxes)), "labels": torch.as_tensor(s.categories)}
                    for s in ss
                ],
            )
    model.train()
    r = ev.compute()
    return r


curve = []
train_time = 0.0
step = 0
next_eval = a.eval_every
losses = []
model.train()
while train_time < a.minutes * 60:
    t = time.perf_counter()
    enc = batch_of([train.sample(step * a.batch + i) for i in range(a.batch)])
    out = model(pixel_values=enc["pixel_values"], pixel_mask=enc.get("pixel_mask"), labels=enc["labels"])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    opt.step()
    opt.zero_grad()
    sched.step()
    train_time += time.perf_counter() - t
    step += 1
    losses.append(out.loss.item())
    if train_time >= next_eval or train_time >= a.minutes * 60:
        r = evaluate()
        next_eval += a.eval_every
        curve.append(
            {
                "train_s": round(train_time, 1),
                "step": step,
                "loss": float(np.mean(losses[-20:])),
                "map_50": round(r["eval_map_50"], 4),
                "map": round(r["eval_map"], 4),
            }
        )
        print(a.tag, curve[-1], flush=True)
json.dump({"args": vars(a), "curve": curve}, open(f"detection_study_{a.tag}.json", "w"))
