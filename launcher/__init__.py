"""launcher: controlled LLM fine-tuning experiments on Slurm, DeepSpeed and one comparison table."""

__version__ = "0.1.0"
