"""``python -m bench``: see ``bench/run.py`` (``--help`` for the flags)."""

from bench.run import main

raise SystemExit(main())
