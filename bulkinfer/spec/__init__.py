"""The job spec: typed, validated config objects (schema.py) loaded from YAML plus `--set`
overrides (load.py).

Every mistake a user can make in a spec (unknown key, wrong type, impossible value, missing file)
is reported as one line naming the key, so a job fails in a second rather than at row 40,000.
"""

from bulkinfer.spec.load import load_spec
from bulkinfer.spec.schema import (
    GENERATE_KEYS,
    PACKAGE_PREFIX,
    TASK_ONLY_KEYS,
    BatchingSpec,
    CheckpointSpec,
    InputSpec,
    JobSpec,
    ModelSpec,
    OutputSpec,
    ProgressSpec,
    TaskSpec,
)

__all__ = [
    "GENERATE_KEYS",
    "PACKAGE_PREFIX",
    "TASK_ONLY_KEYS",
    "BatchingSpec",
    "CheckpointSpec",
    "InputSpec",
    "JobSpec",
    "ModelSpec",
    "OutputSpec",
    "ProgressSpec",
    "TaskSpec",
    "load_spec",
]
