"""tierrt.scheduler: the pipeline that moves blocks between tiers while the model computes."""
