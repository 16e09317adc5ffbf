"""``python -m megamix`` is the ``megamix`` command (also under ``torchrun -m megamix``)."""

import sys

from megamix.cli import main

sys.exit(main())
