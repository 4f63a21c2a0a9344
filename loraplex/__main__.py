"""``python -m loraplex ...``: the same as the ``loraplex`` command."""

import sys

from loraplex.cli import main

sys.exit(main())
