"""`python -m granite_mlx.serve ...`, the same as `granite-mlx serve`."""

import sys

from .cli import main

sys.exit(main())
