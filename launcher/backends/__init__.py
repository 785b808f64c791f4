"""Backends that run the planned runs: Slurm (submitit), local processes, DeepSpeed hostfile; the protocol
in ``base``, built by name in ``registry``. They read and write run directories (launcher.rundir) and
import nothing from submit: the caller hands in the progress view."""
