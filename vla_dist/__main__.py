"""`python -m vla_dist ...` is the `vla-dist` command."""

from vla_dist.cli import main

raise SystemExit(main())
