"""`python -m snakemake`, with the SLURM executor's status polling at a fixed short interval (tests only).

snakemake-executor-plugin-slurm 2.8 waits ``--slurm-init-seconds-before-status-checks`` seconds after a poll that
saw a job finish, and 10 s longer after every poll that did not (up to 180 s): right for a cluster, where jobs run
for minutes to hours, but on the test cluster a job of a few seconds would be noticed only after 12, 33 or 64 s.
This entry point pins that interval (``FFMERGE_TEST_SLURM_POLL_SECONDS``, default 2) and changes nothing else:
submission (sbatch), status queries (squeue) and the job step (srun inside each job) are the plugin's own code.

Usage: python tests/slurm/snakemake_fast_poll.py <snakemake arguments>
"""

from __future__ import annotations

import os
import sys

import snakemake_executor_plugin_slurm as slurm_plugin


def _poll_seconds(self) -> float:
    return float(os.environ.get("FFMERGE_TEST_SLURM_POLL_SECONDS", "2"))


def _ignore(self, value) -> None:  # the plugin's back-off writes here
    pass


slurm_plugin.Executor.next_seconds_between_status_checks = property(_poll_seconds, _ignore)

if __name__ == "__main__":
    from snakemake.cli import main

    sys.argv[0] = "snakemake"
    main()
