"""What the spec's semantic checks (launcher.spec.check) need to know from the layers above the spec:
the bundled architecture descriptions, the template names, which data files can be read and where
the experiment directory goes. The
planner hands this in, so the spec package imports nothing above itself.
"""

from __future__ import annotations

from launcher.data.columns import columns_problems
from launcher.data.records import data_file_problem
from launcher.data.templates import check_template
from launcher.plan.archs import bundled_arch_names
from launcher.rundir.paths import experiment_dir
from launcher.spec.check import InputKnowledge

INPUT_KNOWLEDGE = InputKnowledge(
    arch_names=bundled_arch_names,
    check_template=check_template,
    data_file_problem=data_file_problem,
    experiment_dir=experiment_dir,
    columns_problems=columns_problems,
)
