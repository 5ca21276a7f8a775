"""Training: a flat config, one shared loop, and short recipes for lora, dreambooth, textual inversion, pivotal."""
