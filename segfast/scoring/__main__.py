"""``python -m segfast.scoring`` (also under torchrun): the ``segfast score`` command."""
from segfast.scoring.command import main

raise SystemExit(main())
