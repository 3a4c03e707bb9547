"""Identity-conditioned LDM training: images + contexts -> VQ latents -> ConditionalUNet (CPD, EMA).

Three resumable stages, one module each, plus the job that chains them on Ray:

1. :mod:`~synray.ldm.first_stage`: the published VQ-f4 files copied beside the run, or a small
   autoencoder fitted on the training images (how the mini world gets its own LDM).
2. :mod:`~synray.ldm.encode`: contexts and latents once per image, one idempotent Parquet file per
   unit of images (images listed and read by :mod:`~synray.ldm.data`).
3. :mod:`~synray.ldm.learner`: the plain-torch training loop shared by Ray Train workers and Tune
   trials, checkpointing in the published layout.

:mod:`~synray.ldm.job` is the Ray Train worker function and the ``synray train-ldm`` driver.
"""
