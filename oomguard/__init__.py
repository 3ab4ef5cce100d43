"""oomguard: an OOM-resilient supervisor for LLM fine-tuning."""

__version__ = "0.1.0"
