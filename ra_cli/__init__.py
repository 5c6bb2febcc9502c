"""ra's command line; see ra_cli/main.py."""
