"""Baselines beside the LoRA-block Laplace posteriors: last-layer Laplace (laplace-torch), LoRA deep
ensembles, MC dropout on the LoRA adapters, variational (BayesLoRA-style) LoRA, and cheap per-block
importance scores compared with ΔECE(ℓ)."""
