"""SynthDistill: latent generators, teachers and the distillation loop."""
