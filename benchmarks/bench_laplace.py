"""Benchmark: our K-FAC fit and per-block GLM sweep vs laplace-torch on the same model and data.

Random weights and synthetic images (the compute of the real study, not its numbers):

(a) K-FAC GGN fit over all LoRA factors: :func:`lib.laplace.curvature.fit_kron` vs
    ``KronLaplace.fit`` (CurvlinopsGGN), images/s, in two settings run identically by both:
    exact GGN + K-FAC-expand (laplace-torch's default) and one-sample MC Fisher + K-FAC-reduce
    (the ViT-B/16 profile's setting); ours with one backward pass per output vector (C − 1 for
    the exact GGN, :func:`lib.laplace.curvature.output_vectors`) and with ``--class-chunk``
    vectors per vmapped backward.
(b) the per-layer sweep of 25 posteriors (L single blocks, all, L leave-one-out) on ``--n-test``
    images: ours = one perturbation bank + 25 ``subset_probs`` (probit and MC); laplace-torch =
    its GLM predictive (probit) per subset, each subset's KronLaplace fitted with the other blocks
    frozen (fit time excluded), run on as many images as ``--peer-budget-s`` allows and
    EXTRAPOLATED linearly to ``--n-test``.
(c) peak GPU memory of every phase; (d) max |Δp| between our probit and laplace-torch's probit
    on the images both ran (ours at ``--n-samples`` and at ``--check-samples`` samples).

Targets: sweep >= 20x faster, K-FAC fit >= 3x faster than laplace-torch.

    python benchmarks/bench_laplace.py --device cuda --model vit_base_patch16_224 --img 224 \\
        --classes 100 --r 16 --out bench.json
    python benchmarks/bench_laplace.py --tiny --out bench_tiny.json
    python benchmarks/bench_laplace.py --profile cifar10-cpu --out benchmarks/bench_laplace_cifar10-cpu.json

``--profile P``: the profile's model (its shipped or pre-trained backbone, checked by sha256), LoRA
rank and classes, and its real images: the K-FAC fit on training images, the sweep on test images
(preprocessed as in the study). The adapters are not trained (B drawn at 0.02 scale as above): the
benchmark measures compute, not calibration.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from lib.config import Config, LoraConfig, ModelConfig, load_params, params_path
from lib.data import Preprocess, splits_for
from lib.laplace.isotropic import IsotropicPosterior
from lib.laplace.predictive import perturbation_bank, perturbation_banks, standard_subsets, subset_probs
from lib.model import add_lora, build_backbone, data_config, lora_modules, n_blocks, set_fused_attention

SIZES = {
    "tiny": dict(model="vit_tiny_patch16_224", img=16, classes=10, r=2, n_test=256, batch_size=32, fit_n=64,
                 fit_batch_size=16, class_chunk=10, peer_budget_s=30.0, check_samples=1024,
                 kwargs=dict(patch_size=4, embed_dim=32, depth=12, num_heads=2)),
    "full": dict(model="vit_base_patch16_224", img=224, classes=100, r=16, n_test=600, batch_size=32, fit_n=64,
                 fit_batch_size=16, class_chunk=10, peer_budget_s=120.0, check_samples=64, kwargs={}),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="12-block width-32 ViT on 16 px images, CPU-sized defaults")
    p.add_argument("--profile", help="take model, LoRA rank, classes and images from params/<profile>.yml (CPU-sized defaults)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", help="timm name (default vit_base_patch16_224)")
    p.add_argument("--img", type=int, help="image size (default 224)")
    p.add_argument("--classes", type=int, help="default 100")
    p.add_argument("--r", type=int, help="LoRA rank (default 16)")
    p.add_argument("--n-test", type=int, help="test images of the sweep (default 600: ~6 min in all on an H100)")
    p.add_argument("--batch-size", type=int, help="bank batch size (default 32)")
    p.add_argument("--k-chunk", type=int, default=None, help="tangents per vmap call (default: all)")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--check-samples", type=int, help="samples of the fp32 bank of the (d) check (default 64)")
    p.add_argument("--fit-n", type=int, help="images of the K-FAC fit benchmark (default 64)")
    p.add_argument("--fit-batch-size", type=int, help="default 16")
    p.add_argument("--class-chunk", type=int, help="classes per batched backward of the exact fit (default 10)")
    p.add_argument("--peer-fit-n", type=int, default=4, help="images of each laplace-torch subset fit")
    p.add_argument("--peer-budget-s", type=float, help="laplace-torch sweep time budget (default 120 s)")
    p.add_argument("--peer-batch-size", type=int, default=4, help="first laplace-torch batch (halved on OOM)")
    p.add_argument("--prior-precision", type=float, default=1.0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="bank precision (default bf16 on CUDA)")
    p.add_argument("--batching", choices=["shared", "folded", "both"], default="shared",
                   help="vmap over tangents with a shared primal, a folded primal, or time both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bank-reverse", dest="bank_reverse", action="store_false",
                   help="skip timing the reverse-mode bank (output gradients) next to the forward-mode one")
    p.add_argument("--parts", choices=["fit", "sweep", "all"], default="all", help="which of (a) and (b)-(d) to run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each fit; the median is reported")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.cfg = None
    if args.profile is not None:
        if args.tiny:
            p.error("--profile and --tiny are exclusive")
        args.cfg = Config.from_dict(load_params(params_path(args.profile)), source=f"params/{args.profile}.yml")
        args.model, args.classes, args.r = args.cfg.model.name, args.cfg.data.num_classes, args.cfg.lora.r
        args.img = args.cfg.model.kwargs.get("img_size", 224)
    for k, v in SIZES["tiny" if args.tiny or args.profile else "full"].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.kwargs = dict(args.cfg.model.kwargs) if args.cfg else {**args.kwargs, "img_size": args.img}
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


@contextmanager
def timed(device: torch.device, record: dict, key: str, repeat: bool = False):
    """Wall time of the block (CUDA synchronised) into ``record[key]`` and peak memory into ``record[key + '_mem_gb']``.

    ``repeat``: the times of every call are kept in ``record[key + '_runs']`` and ``record[key]``
    is their median.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        record[key + "_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    record[key] = time.perf_counter() - t0
    if repeat:
        runs = record.setdefault(key + "_runs", [])
        runs.append(record[key])
        record[key] = statistics.median(runs)
    mem = f", peak {record[key + '_mem_gb']:.2f} GiB" if device.type == "cuda" else ""
    print(f"  {key}: {record[key]:.2f}{mem}", flush=True)


def make_model(args, device):
    model_cfg = args.cfg.model if args.cfg else ModelConfig(name=args.model, kwargs=args.kwargs)
    lora_cfg = args.cfg.lora if args.cfg else LoraConfig(r=args.r, alpha=2.0 * args.r)
    model = add_lora(build_backbone(model_cfg, args.classes, seed=args.seed, device="cpu"), lora_cfg, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for m in lora_modules(model):
            m.B.weight.copy_(0.02 * torch.randn(m.B.weight.shape, generator=gen))
    return model.to(device).eval()


def synthetic(n, args, seed, device, split="train"):
    """``n`` (image, label) pairs: random normal images drawn from ``seed``, or with ``--profile`` the
    first ``n`` images of the profile's ``split`` (train: the fits, test: the sweep), preprocessed as in the study."""
    if args.cfg is not None:
        part = getattr(splits_for(args.cfg), split)
        if n > len(part):
            raise ValueError(f"{n} images asked of the {split} split ({len(part)}) of profile '{args.profile}'; "
                             "lower --n-test or --fit-n")
        return args.preprocess(part.x[:n]).to(device), part.y[:n].to(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, args.img, args.img, generator=gen)
    y = torch.randint(0, args.classes, (n,), generator=gen)
    return x.to(device), y.to(device)


def batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def only_lora_trainable(model, blocks):
    keep = {id(w) for m in lora_modules(model) if m.block in blocks for w in (m.A.weight, m.B.weight)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def peer_laplace(model, fit, blocks, prior_precision, kfac="expand", fisher="exact"):
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsGGN

    only_lora_trainable(model, blocks)
    la = KronLaplace(model, "classification", prior_precision=prior_precision, backend=CurvlinopsGGN,
                     backend_kwargs={"stochastic": fisher == "mc"}, asdl_fisher_kwargs={"kfac_approx": kfac})
    la.fit(_Loader(fit), progress_bar=False)
    return la


class _Loader:
    """A list of (x, y) batches with the ``dataset`` length laplace-torch's fit reads."""

    def __init__(self, data):
        self.data = data
        self.dataset = range(sum(len(b[1]) for b in data))

    def __iter__(self):
        return iter(self.data)

    def __len__(self):
        return len(self.data)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


FIT_SETTINGS = {
    # like for like with laplace-torch's default: exact GGN (C backward passes there, C − 1 here), K-FAC-expand
    "expand_exact": dict(kfac="expand", fisher="exact"),
    # the study's ViT-B/16 setting: one-sample MC Fisher, K-FAC-reduce (laplace-torch: stochastic=True)
    "reduce_mc": dict(kfac="reduce", fisher="mc"),
}


def bench_fit(model, args, device, res):
    """K-FAC fit images/s, ours (fp32; bf16 autocast on CUDA; one backward per output vector or
    ``--class-chunk`` vectors per vmapped backward) vs laplace-torch, in both FIT_SETTINGS; for the
    exact GGN also the worst relative deviation of our K-FAC factors from laplace-torch's."""
    from lib.laplace.curvature import fit_kron

    from lib.laplace.reference import factor_deviation

    ours = {}
    fit_x, fit_y = synthetic(args.fit_n, args, args.seed + 10, device)
    fit = batches(fit_x, fit_y, args.fit_batch_size)
    all_blocks = range(n_blocks(model))
    precisions = {"fp32": None, **({"bf16": torch.bfloat16} if device.type == "cuda" else {})}
    for setting, kw in FIT_SETTINGS.items():
        chunks = [1, args.class_chunk] if kw["fisher"] == "exact" else [1]
        for prec, autocast in precisions.items():
            for chunk in chunks:
                key = f"{setting}_ours_{prec}_chunk{chunk}"
                set_fused_attention(model, True)
                gen = torch.Generator(device=device).manual_seed(args.seed)
                fit_kron(model, fit[:1], device=device, autocast_dtype=autocast, class_chunk=chunk, generator=gen,
                         progress=False, **kw)
                for _ in range(args.repeats):
                    with timed(device, res, f"fit_{key}_s", repeat=True):
                        curv = fit_kron(model, fit, device=device, autocast_dtype=autocast, class_chunk=chunk,
                                        generator=gen, progress=False, **kw)
                ours[key] = curv
        set_fused_attention(model, True)
        peer_laplace(model, fit[:1], all_blocks, args.prior_precision, **kw)
        for _ in range(args.repeats):
            with timed(device, res, f"fit_{setting}_peer_s", repeat=True):
                la = peer_laplace(model, fit, all_blocks, args.prior_precision, **kw)
        if kw["fisher"] == "exact":  # the MC Fisher draws other labels in each library
            for key, curv in ours.items():
                res[f"fit_{key}_factor_max_rel_diff"] = factor_deviation(model, curv, la)[1]
        ours.clear()
        for key in [k[4:-2] for k in list(res) if k.startswith(f"fit_{setting}_") and k.endswith("_s")
                    and not k.endswith("_img_per_s")]:
            res[f"fit_{key}_img_per_s"] = args.fit_n / res[f"fit_{key}_s"]
            if "_ours_" in key:
                res[f"fit_{key}_ratio"] = res[f"fit_{setting}_peer_s"] / res[f"fit_{key}_s"]


def sweep_subsets(L):
    named = standard_subsets(L)
    keys = [f"single {i}" for i in range(L)] + ["all"] + [f"all but {i}" for i in range(L)]
    return {k: named[k] for k in keys}


def bench_sweep(model, args, device, res):
    from lib.laplace import KronPosterior, fit_kron

    L = n_blocks(model)
    subsets = sweep_subsets(L)
    peer_fit = batches(*synthetic(args.peer_fit_n, args, args.seed + 20, device), args.fit_batch_size)
    set_fused_attention(model, True)
    posterior = KronPosterior(
        fit_kron(model, peer_fit, device=device, kfac="expand", fisher="exact", progress=False),
        prior_precision=args.prior_precision,
    )
    test_x, test_y = synthetic(args.n_test, args, args.seed + 30, device, split="test")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    kw = dict(n_samples=args.n_samples, seed=args.seed, device=device, dtype=dtype, k_chunk=args.k_chunk,
              store_device=device)
    modes = ["shared", "folded"] if args.batching == "both" else [args.batching]
    runs = {m: dict(mode="forward", tangent_batching=m) for m in modes}
    if args.bank_reverse:
        runs["reverse"] = dict(mode="reverse")
    warm = batches(test_x[: args.batch_size], test_y[: args.batch_size], args.batch_size)
    for key, how in runs.items():
        perturbation_bank(model, posterior, warm, **how, **kw)
        with timed(device, res, f"bank_{key}_s"):
            bank = perturbation_bank(model, posterior, batches(test_x, test_y, args.batch_size), **how, **kw)
        if key == "reverse":
            res["bank_reverse_max_abs_diff"] = float((bank.delta - forward_bank.delta).abs().max())
        else:
            forward_bank = bank
    if args.bank_reverse:
        # the study's pairing: a Laplace bank and its isotropic control's from one pass, against two passes
        control = IsotropicPosterior.like(posterior)
        pair = batches(test_x, test_y, args.batch_size)
        with timed(device, res, "bank_control_s"):
            alone = perturbation_bank(model, control, pair, mode="reverse", **kw)
        with timed(device, res, "bank_pair_s"):
            both = perturbation_banks(model, [posterior, control], pair, mode="reverse", **kw)
        res["bank_two_passes_over_pair"] = (res["bank_reverse_s"] + res["bank_control_s"]) / res["bank_pair_s"]
        res["bank_pair_max_abs_diff"] = max(float((both[0].delta - bank.delta).abs().max()),
                                            float((both[1].delta - alone.delta).abs().max()))
    if len(modes) == 2:
        res["bank_folded_over_shared"] = res["bank_folded_s"] / res["bank_shared_s"]
    if args.bank_reverse:
        res["bank_forward_over_reverse"] = res[f"bank_{modes[0]}_s"] / res["bank_reverse_s"]
    res["bank_s"] = min(res[f"bank_{key}_s"] for key in runs)
    for method in ("probit", "mc"):
        subset_probs(bank, subsets["all"], method=method)
        with timed(device, res, f"subsets_{method}_s"):
            probs = {k: subset_probs(bank, m, method=method) for k, m in subsets.items()}
    res["ours_sweep_s"] = res["bank_s"] + res["subsets_probit_s"]

    budget = args.peer_budget_s / len(subsets)
    peer = {"images": {}, "time_s": {}, "batch": {}, "fit_s": 0.0, "oom": []}
    diffs, diffs_check = [], []
    for name, mask in subsets.items():
        blocks = [i for i in range(L) if mask[i]]
        t0 = time.perf_counter()
        la = peer_laplace(model, peer_fit, blocks, args.prior_precision)
        peer["fit_s"] += time.perf_counter() - t0
        set_fused_attention(model, False)
        bs, n, spent, out = args.peer_batch_size, 0, 0.0, []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        while n < args.n_test and (n == 0 or spent < budget):
            xb = test_x[n : n + bs]
            try:
                if n == 0:
                    la(xb[:1], pred_type="glm", link_approx="probit")
                t0 = time.perf_counter()
                p = la(xb, pred_type="glm", link_approx="probit")
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except RuntimeError as err:
                if not is_oom(err) or bs == 1:
                    raise
                peer["oom"].append(f"{name}: batch {bs}")
                bs //= 2
                torch.cuda.empty_cache()
                continue
            spent += time.perf_counter() - t0
            out.append(p.float())
            n += len(xb)
        set_fused_attention(model, True)
        if device.type == "cuda":
            res.setdefault("peer_predict_mem_gb", 0.0)
            res["peer_predict_mem_gb"] = max(res["peer_predict_mem_gb"], torch.cuda.max_memory_allocated(device) / 2**30)
        peer["images"][name], peer["time_s"][name], peer["batch"][name] = n, spent, bs
        theirs = torch.cat(out)
        diffs.append((probs[name][:n] - theirs).abs().max().item())
        diffs_check.append((theirs, name, n))
    peer_per_image = sum(peer["time_s"][k] / peer["images"][k] for k in subsets)
    res["peer_sweep_extrapolated_s"] = peer_per_image * args.n_test
    res["peer_s_per_image_per_subset"] = peer_per_image / len(subsets)
    res["peer_images_min"] = min(peer["images"].values())
    res["peer_images_total"] = sum(peer["images"].values())
    res["peer"] = peer
    res["sweep_ratio"] = res["peer_sweep_extrapolated_s"] / res["ours_sweep_s"]
    res["max_abs_dp_probit"] = max(diffs)

    n_max = max(n for _, _, n in diffs_check)
    check = perturbation_bank(model, posterior, batches(test_x[:n_max], test_y[:n_max], args.batch_size),
                              **{**kw, "n_samples": args.check_samples, "dtype": torch.float32,
                                 "k_chunk": min(args.check_samples, args.k_chunk or 256)})
    res["max_abs_dp_probit_check"] = max(
        (subset_probs(check, subsets[name], method="probit")[:n] - theirs).abs().max().item()
        for theirs, name, n in diffs_check
    )


def report(res, args):
    n = args.n_test
    rows = []
    for setting in FIT_SETTINGS:
        for key in sorted(k[4:-10] for k in res if k.startswith(f"fit_{setting}_") and k.endswith("_img_per_s")):
            ratio = f" ({res[f'fit_{key}_ratio']:.2f}x)" if f"fit_{key}_ratio" in res else ""
            if f"fit_{key}_factor_max_rel_diff" in res:
                ratio += f", Δ {res[f'fit_{key}_factor_max_rel_diff']:.1e}"
            rows.append((f"(a) K-FAC fit {key}", f"{res[f'fit_{key}_img_per_s']:.1f} img/s{ratio}",
                         res.get(f"fit_{key}_s_mem_gb")))
    if "sweep_ratio" in res:
        rows += sweep_rows(res, args)
    print(f"\n{'quantity':<58} {'value':>28} {'peak GPU GiB':>13}")
    for name, val, mem in rows:
        print(f"{name:<58} {val:>28} {'' if mem is None else f'{mem:.2f}':>13}")
    if any(k.endswith("_factor_max_rel_diff") for k in res):
        print("Δ: worst max |ours − laplace-torch| over every LoRA weight's K-FAC factors G and X, relative to "
              "that factor's max |entry| (exact GGN; the MC Fisher draws other labels in each library)")
    for setting in FIT_SETTINGS:
        ratios = [(v, k) for k, v in res.items() if k.startswith(f"fit_{setting}_ours") and k.endswith("_ratio")]
        if ratios:
            best = max(ratios)
            print(f"K-FAC fit speed-up vs laplace-torch, {setting}: best {best[0]:.2f}x ({best[1][4:-6]})"
                  f"  (target >= 3x: {'MET' if best[0] >= 3 else 'NOT MET'})")
    if "sweep_ratio" in res:
        sweep_summary(res, args)


def sweep_rows(res, args):
    n = args.n_test
    return [
        (f"(b) ours: bank, faster mode ({args.dtype}, K={args.n_samples}, N={n})", f"{res['bank_s']:.2f} s", res.get(f"bank_{args.batching if args.batching != 'both' else 'shared'}_s_mem_gb")),
        ("(b) ours: 25 subset_probs probit", f"{res['subsets_probit_s']:.3f} s", res.get("subsets_probit_s_mem_gb")),
        ("(b) ours: 25 subset_probs MC", f"{res['subsets_mc_s']:.3f} s", res.get("subsets_mc_s_mem_gb")),
        ("(b) ours: sweep total (bank + probit)", f"{res['ours_sweep_s']:.2f} s", None),
        (f"(b) laplace-torch sweep, EXTRAPOLATED to N={n}", f"{res['peer_sweep_extrapolated_s']:.1f} s", res.get("peer_predict_mem_gb")),
    ]


def sweep_summary(res, args):
    print(f"\nlaplace-torch sweep extrapolated linearly from {res['peer_images_min']} to "
          f"{max(res['peer']['images'].values())} images per subset ({res['peer_images_total']} image-subsets; "
          f"{res['peer_s_per_image_per_subset']:.4f} s per image per subset; subset fits {res['peer']['fit_s']:.1f} s "
          f"excluded; OOM retries: {res['peer']['oom'] or 'none'})")
    if "bank_folded_over_shared" in res:
        print(f"tangent batching: folded / shared bank time = {res['bank_folded_over_shared']:.2f}")
    if "bank_forward_over_reverse" in res:
        print(f"bank: forward-mode / reverse-mode time = {res['bank_forward_over_reverse']:.2f} "
              f"(max |Δ delta| {res['bank_reverse_max_abs_diff']:.2e}); the sweep uses the faster")
    if "bank_two_passes_over_pair" in res:
        print(f"bank and isotropic control: two passes / one shared pass = {res['bank_two_passes_over_pair']:.2f}x "
              f"(max |Δ delta| {res['bank_pair_max_abs_diff']:.2e})")
    print(f"sweep speed-up vs laplace-torch: {res['sweep_ratio']:.1f}x  (target >= 20x: "
          f"{'MET' if res['sweep_ratio'] >= 20 else 'NOT MET'})")
    print(f"(d) max |p_ours - p_laplace-torch| (probit) on shared images: {res['max_abs_dp_probit']:.2e} at "
          f"K={args.n_samples}, {res['max_abs_dp_probit_check']:.2e} at K={args.check_samples} (fp32); "
          "ours estimates diag(J Σ Jᵀ) from K samples, laplace-torch computes it exactly")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = make_model(args, device)
    args.preprocess = Preprocess.from_data_config(data_config(model))
    res = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("cfg", "preprocess")},
           "torch": torch.__version__, "platform": platform.platform(),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
           "n_blocks": n_blocks(model), "n_lora_params": sum(w.numel() for m in lora_modules(model) for w in (m.A.weight, m.B.weight))}
    print(f"{args.model} {args.kwargs} C={args.classes} r={args.r}: {res['n_blocks']} blocks, "
          f"{res['n_lora_params']} LoRA params on {res['device_name']}")
    if args.parts in ("fit", "all"):
        bench_fit(model, args, device, res)
    if args.parts in ("sweep", "all"):
        bench_sweep(model, args, device, res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    report(res, args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
