"""``python -m aiki``: the ``aiki`` command."""

import sys

from aiki.cli import main

sys.exit(main())
