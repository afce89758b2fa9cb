"""``python -m suscept run CONFIG.toml`` / ``python -m suscept report FOLDER``."""

import os
import sys

from suscept.cli import main

code = main()
if "LOCAL_RANK" in os.environ:  # a torchrun rank: its results are written and flushed by now;
    sys.stdout.flush()  # skip interpreter teardown, where a rank sometimes aborts (SIGABRT,
    sys.stderr.flush()  # "terminate called without an active exception") after its work
    os._exit(code)
sys.exit(code)
