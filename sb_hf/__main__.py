"""``python -m sb_hf ...`` is ``sb-hf ...`` (e.g. ``accelerate launch -m sb_hf run -- train.py``)."""

import sys

from .cli import main

sys.exit(main())
