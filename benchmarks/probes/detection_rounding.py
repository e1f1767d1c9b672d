"""What differs numerically between two code versions of the digits detector's training step (detection_regression.md).

Run with PYTHONPATH set to a checkout (the package and its scripts/ are read from there) and a digits backbone folder:
    PYTHONPATH=CHECKOUT python benchmarks/probes/detection_rounding.py CHECKOUT pvt-digits
Prints, for the default detector on that backbone: how many PVT layer calls of a training forward take
`cpu_acceleration`'s fast path, how far that forward's feature maps lie from the reference code's (same random state,
so the same stochastic-depth draws), the gradient reaching the backbone on one batch, and how far PyTorch's fused
AdamW and its default (foreach) AdamW drift apart in 5 steps with identical gradients.
"""

import copy
import importlib.util
import sys

import torch
from modeling_pvt.detection.modeling import (
    build_detector,
    build_detector_config,
    find_pvt_backbone,
    freeze_backbone_stages,
    parameter_groups,
)

import modeling_pvt.modeling_pvt as pvt_code
from modeling_pvt import PvtBackbone

checkout, backbone_dir = sys.argv[1:3]
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("train_detection", f"{checkout}/scripts/train_detection.py")
script = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = script
spec.loader.exec_module(script)

calls = {True: 0, False: 0}
reference_predicate = pvt_code.fast_path_applies


def counting_predicate(layer, hidden_states):
    taken = reference_predicate(layer, hidden_states)
    calls[bool(taken)] += 1
    return taken


pvt_code.fast_path_applies = counting_predicate
torch.manual_seed(0)
backbone = PvtBackbone.from_pretrained(backbone_dir)
settings = script.DIGITS_DETECTOR_SETTINGS["deformable_detr"]
config = build_detector_config("deformable_detr", backbone.config, {i: str(i) for i in range(10)}, **settings)
model = build_detector("deformable_detr", config, backbone)
freeze_backbone_stages(model, script.DIGITS_RECIPE["freeze_backbone_stages"])
model.train()
pixel_values = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
model(pixel_values=pixel_values, labels=labels).loss.backward()
pvt = find_pvt_backbone(model)
print(f"training forward: fast path taken in {calls[True]} PVT layer calls, refused in {calls[False]}")
gradient = pvt.encoder.block[2][0].layer_norm_1.weight.grad.abs().sum().item()
print(f"backbone stage-3 first LayerNorm weight: gradient |sum| {gradient:.9f}")

pvt_code.fast_path_applies = counting_predicate
torch.manual_seed(1)
as_trained = [feature_map.detach() for feature_map in pvt(pixel_values).feature_maps]
pvt_code.fast_path_applies = lambda layer, hidden_states: False
torch.manual_seed(1)
reference = [feature_map.detach() for feature_map in pvt(pixel_values).feature_maps]
differences = [f"{(first - second).abs().max().item():.1e}" for first, second in zip(as_trained, reference)]
print(f"training forward vs the reference code, largest difference per feature map: {differences}")

twin = copy.deepcopy(model)
optimizers = [
    torch.optim.AdamW(parameter_groups(net, 5e-4, 1e-4, 1e-4), fused=fused)
    for net, fused in ((model, True), (twin, False))
]
for step in range(5):
    generator = torch.Generator().manual_seed(step)
    for first, second in zip(model.parameters(), twin.parameters()):
        if first.requires_grad:
            gradient = torch.randn(first.shape, generator=generator) * 1e-3
            first.grad, second.grad = gradient.clone(), gradient.clone()
    for optimizer in optimizers:
        optimizer.step()
    drift = max((first - second).abs().max().item() for first, second in zip(model.parameters(), twin.parameters()))
    print(f"AdamW fused vs foreach, step {step + 1}: largest parameter difference {drift:.2e}")
