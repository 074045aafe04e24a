"""``python -m bench.load``: the load suite with every knob (see ``bench.load``)."""

import sys

from bench.load import main

sys.exit(main())
