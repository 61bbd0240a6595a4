"""`python -m agegender.train` (used under torchrun) = `train-adience`."""

from agegender.train.cli import main

main()
