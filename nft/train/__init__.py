"""`nft train`: one training run (run.py) made of setup.py, rollout.py, plan.py, rows.py, update.py, validation.py,
checkpoint.py, seeds.py and engines.py."""


class Preempted(Exception):
    """A run stopped on a scheduler's signal after writing a checkpoint; rerunning the same command resumes it."""
