"""`python -m pgolf`: the same command as `pgolf`."""

from pgolf.cli import main

main()
