"""``python -m adapterkit`` is the ``adapterkit`` command."""

from adapterkit.cli.main import main

if __name__ == "__main__":
    main()
