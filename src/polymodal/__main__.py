"""`python -m polymodal ...` (and so `torchrun ... -m polymodal ...`)."""

from polymodal.cli import main

main()
