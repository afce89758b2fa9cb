"""``python -m suscept run CONFIG.toml`` / ``python -m suscept report FOLDER``."""

import sys

from suscept.cli import main

sys.exit(main())
