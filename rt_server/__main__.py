"""`python -m rt_server` runs the command line."""

from rt_server.cli import main

raise SystemExit(main())
