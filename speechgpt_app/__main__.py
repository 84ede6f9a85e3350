"""`python -m speechgpt_app ...` is the command line (see cli.py)."""

from speechgpt_app.cli import main

raise SystemExit(main())
