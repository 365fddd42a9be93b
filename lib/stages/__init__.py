"""The study's stages after the MAP model (:mod:`lib.pipeline`), one module per stage so that each
stage's key hashes only the code it runs (:func:`lib.artifacts.cached`, :mod:`lib.codehash`).

``laplace`` (:mod:`~lib.stages.laplace`) → ``bank``, ``bank_val``, ``bank_iso``, ``bank_iso_val``
(:mod:`~lib.stages.banks`) → ``subsets`` (:mod:`~lib.stages.subsets`) for every seed, and
``curvature_quality`` (:mod:`~lib.stages.quality`) on the first; :class:`~lib.stages.seed.SeedStudy`
holds one seed's stages and reads them; ``attribution`` (:mod:`~lib.stages.attribution`) joins the
seeds. :class:`lib.study.Study` opens them in this order.
"""
