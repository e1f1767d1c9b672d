"""PyTorch's eager LayerNorm against a two-kernel decomposition and torch.compile's kernel, at PVT-small's token
shapes for batch 256 (bf16, CUDA). Behind the README's GPU paragraph.

    python benchmarks/probes/gpu_layernorm.py > benchmarks/probes/gpu_layernorm_h200.log
"""

import torch
import torch.nn.functional as F
from triton.testing import do_bench


def compare(rows: int, channels: int) -> None:
    tokens = torch.randn(rows, channels, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(channels, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(channels, device="cuda", dtype=torch.bfloat16)

    def plain():
        return F.layer_norm(tokens, (channels,), weight, bias, 1e-6)

    def decomposed():
        variance, mean = torch.var_mean(tokens, dim=-1, keepdim=True, correction=0)
        inverse_std = (variance.float() + 1e-6).rsqrt()
        shift = -mean.float() * inverse_std
        normalized = torch.addcmul(shift.to(tokens.dtype), tokens, inverse_std.to(tokens.dtype))
        return torch.addcmul(bias, normalized, weight)

    def float32_chain():
        upcast = tokens.float()
        variance, mean = torch.var_mean(upcast, dim=-1, keepdim=True, correction=0)
        return ((upcast - mean) * (variance + 1e-6).rsqrt() * weight + bias).to(tokens.dtype)

    compiled = torch.compile(plain)
    reference = F.layer_norm(tokens.float(), (channels,), weight.float(), bias.float(), 1e-6)
    gigabytes = 2 * tokens.numel() * tokens.element_size() / 1e9
    variants = {"plain": plain, "decomposed": decomposed, "fp32 chain": float32_chain, "compiled": compiled}
    for name, function in variants.items():
        milliseconds = do_bench(function, warmup=25, rep=100, return_mode="median")
        error = ((function().float() - reference).norm() / reference.norm()).item()
        print(
            f"rows {rows:7d} c {channels:3d} {name:11s} {milliseconds * 1e3:8.1f} us  "
            f"({gigabytes / (milliseconds / 1e3):6.0f} GB/s ideal-bytes)  rel err {error:.1e}"
        )


def main() -> None:
    torch.manual_seed(0)
    for rows, channels in ((256 * 3136, 64), (256 * 784, 128), (256 * 196, 320), (256 * 49, 512)):
        compare(rows, channels)


if __name__ == "__main__":
    main()
