"""loradrift: LoRA vs full fine-tuning, representational drift and serving cost."""

__version__ = "0.1.0"
