"""LoRA fine-tuning throughput of ViT-B/16 at 224 px on synthetic tensors (run on a GPU).

Prints images/s and model FLOP utilisation (FLOPs counted by torch's FlopCounterMode for one
forward+backward, divided by the GPU's dense bf16 peak) for eager and torch.compile training, plus
inference of the plain ViT, of the peft model, and of the peft model with LoRA merged into W.
Reference figures measured earlier on an H100 (bf16): peft inference 4,195 img/s, plain ViT
10,551 img/s, LoRA training 1,663 img/s eager and 2,801 compiled.

    python benchmarks/bench_train.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lib.config import LoraConfig, ModelConfig
from lib.model import add_lora, build_backbone

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
REFERENCE = {"train_eager": 1663.0, "train_compiled": 2801.0, "infer_peft": 4195.0, "infer_plain": 10551.0}


def peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def timed(fn, iters: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    mcfg = ModelConfig(name=args.model, kwargs={"img_size": args.img})
    x = torch.randn(args.batch, 3, args.img, args.img, device=device)
    y = torch.randint(args.classes, (args.batch,), device=device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "batch": args.batch, "model": args.model, "r": args.r}

    plain = build_backbone(mcfg, args.classes, seed=0, device=device).eval()
    with torch.no_grad(), torch.autocast(**amp):
        results["infer_plain"] = args.batch / timed(lambda: plain(x), args.iters, device)

    model = build_backbone(mcfg, args.classes, seed=0, device=device)
    model.requires_grad_(False)
    model = add_lora(model, LoraConfig(r=args.r, alpha=args.r), seed=0).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(fwd):
        with torch.autocast(**amp):
            loss = F.cross_entropy(fwd(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        with torch.autocast(**amp):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
    flops_per_img = counter.get_total_flops() / args.batch
    results["train_flops_per_image"] = flops_per_img
    model.eval()
    with torch.no_grad(), torch.autocast(**amp):
        results["infer_peft"] = args.batch / timed(lambda: model(x), args.iters, device)
    model.train()
    results["train_eager"] = args.batch / timed(lambda: step(model), args.iters, device)
    if device.type == "cuda":
        compiled = torch.compile(model)
        results["train_compiled"] = args.batch / timed(lambda: step(compiled), args.iters, device)
    merged = model.merge_and_unload().eval()
    with torch.no_grad(), torch.autocast(**amp):
        results["infer_merged"] = args.batch / timed(lambda: merged(x), args.iters, device)
    peak = peak_flops(device)
    # the earlier figures were measured on an H100 with the defaults; other settings get no ratio
    reference_setting = device.type == "cuda" and all(getattr(args, k) == ap.get_default(k) for k in
                                                      ("model", "img", "classes", "r", "batch"))
    print(f"device: {results['device']}  batch {args.batch}  training FLOPs/image {flops_per_img / 1e9:.1f} G")
    for key in ("train_eager", "train_compiled", "infer_peft", "infer_merged", "infer_plain"):
        if key not in results:
            continue
        line = f"{key:15s} {results[key]:9.0f} img/s"
        if key.startswith("train") and peak:
            mfu = results[key] * flops_per_img / peak
            results[f"mfu_{key}"] = mfu
            line += f"  MFU {100 * mfu:5.1f}% of {peak / 1e12:.0f} TFLOP/s"
        ref = REFERENCE.get(key) if reference_setting else None
        if ref:
            line += f"  ×{results[key] / ref:.2f} vs earlier {ref:.0f} img/s"
        print(line)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
