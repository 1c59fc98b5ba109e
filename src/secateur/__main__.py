"""`python -m secateur` runs the CLI: the form torchrun launches (`torchrun --nproc_per_node N
-m secateur prune ...`), and a way in when the `secateur` script is not on PATH."""

from secateur.cli import main

raise SystemExit(main())
