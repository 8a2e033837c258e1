#!/usr/bin/env python
"""Start-up of a model job: a fresh interpreter vs a fork of the fork server (``ffmerge.workflow.forkserver``).

Each run launches a job script the way Snakemake does (``python script.py``) that imports what every model
job imports (``ffmerge.workflow.pipeline``: torch, transformers) and then loads SmolLM2-135M's prepared folder and
scores a 64-token row, the first real work of a job. It prints the time from launch to the end of that work
and the row's loss, which must be equal in both ways (the check that the fork computes the same).

    python benchmarks/job_startup.py --model-dir results/lm/model/base --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from ffmerge.workflow.forkserver import SOCKET_ENV, ForkServer

JOB = textwrap.dedent(
    """
    import sys
    from ffmerge.workflow.forkserver import delegate

    delegate()
    import torch
    from ffmerge.workflow import pipeline  # noqa: F401  (what every model job imports)
    from ffmerge.checkpoint import load_model

    torch.set_num_threads(1)
    model = load_model(sys.argv[1], auto_class="AutoModelForCausalLM")
    ids = torch.arange(64).unsqueeze(0) * 97 % model.config.vocab_size
    with torch.no_grad():
        print(repr(model(ids, labels=ids).loss.item()))
    """
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("results/lm/model/base"), help="prepared SmolLM2")
    p.add_argument("--runs", type=int, default=3, help="jobs launched each way")
    return p.parse_args()


def launch(script: Path, model_dir: Path, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(script), str(model_dir)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"the job failed:\n{run.stderr}")
    return seconds, run.stdout.strip()


def main() -> None:
    args = parse_args()
    if not (args.model_dir / "config.json").is_file():
        raise SystemExit(f"{args.model_dir} is not a prepared model: run `snakemake --cores 2` (prepare_model) first")
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "job.py"
        script.write_text(JOB)
        env = {key: value for key, value in os.environ.items() if key != SOCKET_ENV}
        fresh = [launch(script, args.model_dir, env) for _ in range(args.runs)]
        server = ForkServer(Path(tmp) / "server.log")
        ready = time.perf_counter()
        if not server.wait_ready(timeout=300):
            raise SystemExit((Path(tmp) / "server.log").read_text())
        ready = time.perf_counter() - ready
        try:
            forked = [launch(script, args.model_dir, {**env, SOCKET_ENV: server.path}) for _ in range(args.runs)]
        finally:
            server.stop()
        log = (Path(tmp) / "server.log").read_text()
    if log.count(": exit 0,") != args.runs:
        raise SystemExit(f"not every job ran in a fork:\n{log}")
    fresh_s, forked_s = statistics.median(s for s, _ in fresh), statistics.median(s for s, _ in forked)
    same = {out for _, out in fresh} == {out for _, out in forked} and len({out for _, out in fresh}) == 1
    print(f"server start-up (imports, once per run): {ready:.1f} s\n")
    print(f"| job start | median s (of {args.runs}) | ratio | same loss |")
    print("|---|---:|---:|---|")
    print(f"| fresh interpreter | {fresh_s:.2f} | 1.000 | |")
    print(f"| fork of the server | {forked_s:.2f} | {forked_s / fresh_s:.3f} | {same} |")


if __name__ == "__main__":
    main()
