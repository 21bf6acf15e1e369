"""Training: the supervised data pipeline, the modality-grouped sampler and the trainer."""
