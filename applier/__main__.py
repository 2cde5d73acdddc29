"""``python -m applier``: the same as the ``applier`` command."""

import sys

from applier._entry import main

sys.exit(main())
