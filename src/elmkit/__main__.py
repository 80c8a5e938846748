"""``python -m elmkit``: the same as the ``elmkit`` command (what ``accelerate launch -m elmkit`` runs)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
