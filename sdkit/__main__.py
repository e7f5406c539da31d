"""`python -m sdkit ...` (and `accelerate launch -m sdkit train ...`)."""

from sdkit.cli import main

main()
