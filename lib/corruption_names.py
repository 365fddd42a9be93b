"""Names and severities of the CIFAR-10-C corruptions :mod:`lib.corruptions` implements.

A leaf module (no numpy, nothing from ``lib``), so that :mod:`lib.config` can check a profile's
``shift`` section against them without importing the image code (which imports :mod:`lib.data`,
which imports :mod:`lib.config`). :mod:`lib.corruptions` registers exactly these names, in this
order (tested), after :cite:`hendrycks2019benchmarking`.
"""

from __future__ import annotations

CORRUPTION_NAMES = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "defocus_blur",
    "brightness", "fog", "contrast", "jpeg_compression", "pixelate", "saturate",
)
"""The implemented corruptions (noise, blur, weather, digital)."""

SEVERITIES = (1, 2, 3, 4, 5)
"""The severity levels of every corruption."""
