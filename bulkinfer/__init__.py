"""bulkinfer: offline bulk batch inference for transformer models.

The command line (`bulkinfer run job.yaml`) and this module run the same jobs:
`bulkinfer.run("job.yaml", task={"max_new_tokens": 32})` returns the job's summary. Torch and
transformers load on first use, not on import.
"""

from bulkinfer.cache import keep_bytecode
from bulkinfer.process import imports_uninterrupted

__version__ = "0.1.0"

keep_bytecode()  # before torch and transformers are imported


@imports_uninterrupted
def run(job, **kwargs):
    """Run or resume a job; returns its summary. See bulkinfer.api.run."""
    from bulkinfer.api import run as _run

    return _run(job, **kwargs)


@imports_uninterrupted
def plan(job, **overrides):
    """Rows, lengths, budget and batches of a job, no weights loaded. See bulkinfer.api.plan."""
    from bulkinfer.api import plan as _plan

    return _plan(job, **overrides)


@imports_uninterrupted
def validate(job, **overrides):
    """Check a job without loading weights. See bulkinfer.api.validate."""
    from bulkinfer.api import validate as _validate

    return _validate(job, **overrides)


@imports_uninterrupted
def load(job, **overrides):
    """The validated JobSpec of a YAML file or mapping, with overrides. See bulkinfer.api.load."""
    from bulkinfer.api import load as _load

    return _load(job, **overrides)
