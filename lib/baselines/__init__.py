"""Baselines beside the LoRA-block Laplace posteriors: last-layer Laplace (laplace-torch), LoRA
ensembles of the study's MAP models, MC dropout on the LoRA adapters, the variational LoRA of
BayesLoRA (rank-wise variational dropout with pruning), the continued-MAP control of the trained
ones (:mod:`lib.baselines.run` lists them under one signature), cheap per-block importance
scores compared with ΔECE(ℓ) (:mod:`lib.baselines.importance`), the seed-mean table with paired
intervals (:mod:`lib.baselines.table`), and the analysis of a study that the baselines chapter
shows (:mod:`lib.baselines.study`)."""
