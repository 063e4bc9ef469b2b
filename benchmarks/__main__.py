"""``python -m benchmarks``: the suite's one entry point."""

from benchmarks.cli import main

raise SystemExit(main())
