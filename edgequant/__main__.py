"""``python -m edgequant``: the command line (edgequant.cli)."""

from edgequant.cli import main

if __name__ == "__main__":
    main()
