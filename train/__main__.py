"""`python -m agegender.train` (used under torchrun) = `train-adience`."""

from .cli import main

main()
