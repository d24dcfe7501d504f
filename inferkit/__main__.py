"""``python -m inferkit``: the command line, for launchers that start modules (``accelerate launch -m inferkit``)."""

from inferkit.cli.main import main

main()
