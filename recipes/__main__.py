"""``python -m recipes TASK COMMAND [options]``: see ``recipes.cli``."""

import sys

from recipes.launch import check_launch

check_launch()  # before the model libraries load: a launch that started too few processes fails at once

from recipes.cli import main  # noqa: E402

sys.exit(main())
