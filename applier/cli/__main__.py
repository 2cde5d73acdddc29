"""``python -m applier.cli``: the same as the ``applier`` command."""

import sys

from applier.cli import main

sys.exit(main())
