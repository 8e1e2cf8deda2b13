"""Thin shim: `python cli.py ...` is `selfreward ...`."""

from selfreward.cli import main

if __name__ == "__main__":
    main()
