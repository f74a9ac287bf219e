"""``python -m sb_hf.evaluation eval ...`` / ``... lm-eval ...``."""

import sys

from .lm_eval_cli import main

sys.exit(main())
