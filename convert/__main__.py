"""`python -m granite_mlx.convert SRC OUT ...`, the same as `granite-mlx convert`."""

import sys

from .cli import main

sys.exit(main())
