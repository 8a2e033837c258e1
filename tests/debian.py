"""Installing Debian packages that a test needs (slurm-wlm and munge, chromium), shared by tests/slurm/cluster.py
and tests/browser.py.

CI machines start from a clean clone with a stale or empty apt cache, so a first `apt-get install` may fail for
want of package lists: then update them once and try again, and report all three outputs if it still fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence


def apt_install(packages: Sequence[str], log: Callable[[str], None], error: type[Exception] = RuntimeError) -> None:
    """``apt-get install`` ``packages`` (no recommends); ``apt-get update`` only if the first try fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    first = subprocess.run(install, capture_output=True, text=True, env=env)
    log(f"apt-get install {' '.join(packages)}: rc {first.returncode}")
    if first.returncode == 0:
        return
    update = subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env)
    log(f"apt-get update: rc {update.returncode}")
    second = subprocess.run(install, capture_output=True, text=True, env=env)
    if second.returncode != 0:
        raise error(
            f"apt-get install {' '.join(packages)} failed, also after apt-get update:\n"
            + first.stderr[-2000:]
            + update.stderr[-2000:]
            + second.stderr[-2000:]
        )
