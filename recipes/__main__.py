"""``python -m recipes TASK COMMAND [options]``: see ``recipes.cli``."""

import sys

from recipes.cli import main

sys.exit(main())
