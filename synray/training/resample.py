"""Old home of SynthDistill's crop, resampling and KD loss, now :mod:`synray.distill.resample`.

Kept for modules that still import from here; new code imports :mod:`synray.distill.resample`.
"""

from synray.distill.resample import (  # noqa: F401
    CROP_EYES_112, CROP_SIZE, FFHQ_EYES_1024, CropGeometry, crop_and_resize, crop_geometry, kd_loss, kd_metrics,
    resample_latents, resampling_weights,
)
