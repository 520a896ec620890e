"""Kiln's bundled default model: rendered captioned shapes, a tokenizer, training and evaluation.

    python -m export.default_model.train      # VAE -> latent cache -> text encoder + UNet
    python -m export.default_model.evaluate   # prompt-following accuracy of a diffusers folder
"""
