"""``python -m refusal_atlas.cli``."""

from refusal_atlas.cli.app import main

main()
