"""launcher: controlled LLM fine-tuning experiments on Slurm, DeepSpeed and one comparison table."""

from launcher.builtins.ops_cache import use_environment_ops_dir as _use_environment_ops_dir

__version__ = "0.1.0"

# Before anything in this process can JIT-build a DeepSpeed op: one build directory per environment
# (launcher/builtins/ops_cache.py), so no two venvs or containers rebuild each other's ops.
_use_environment_ops_dir()
