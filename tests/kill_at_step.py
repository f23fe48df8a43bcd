"""Run the `rto` command line and SIGKILL the process at a given point: `python kill_at_step.py STEP ARGS...`.

STEP > 0: right after metrics row STEP is logged (mid-training; no cleanup of any kind runs).
STEP < 0: during checkpoint save number -STEP, after its files are written and before the rename.
"""

import os
import signal
import sys

from rto import checkpoint, runtime
from rto.cli import main


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


at = int(sys.argv[1])
if at > 0:
    log = runtime.Run.log

    def log_then_kill(self, step, metrics):
        log(self, step, metrics)
        if step == at:
            kill()

    runtime.Run.log = log_then_kill
else:
    saves = []
    replace = os.replace

    def replace_or_kill(src, dst):
        if checkpoint.PREFIX in str(dst):
            saves.append(dst)
            if len(saves) == -at:
                kill()
        replace(src, dst)

    os.replace = replace_or_kill
sys.exit(main(sys.argv[2:]))
