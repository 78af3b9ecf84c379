"""The `cxr` command, the project's front door (cxr/cli.py)."""
