"""qimem benchmarks: ``python -m bench [SUITE ...] [--quick]`` from the repo root.

Not tests: every suite measures qimem against a peer (raw ``cryptography``, ``age``, a bare
Falcon endpoint ...) in the same run and reports the ratio. See docs/performance.md.
"""

import os
import sys

# ``python -m bench`` puts the current directory (the repo root) first on sys.path. There,
# ``./qimem`` is the bare source folder, which would shadow the installed package: the
# installed one maps the top-level ``hooks/``, ``builtin_plugins/`` and ``server/`` folders
# to ``qimem.hooks`` etc., the bare folder has none of them. Drop the repo root before
# anything imports qimem; ``bench`` itself is already imported, and its submodules are
# found through ``bench.__path__``.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
