"""``python -m ext_proc`` is the ``ext-proc`` command."""

from ext_proc.cli import main

raise SystemExit(main())
