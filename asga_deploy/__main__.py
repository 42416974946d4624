"""`python -m asga_deploy ...` (and `torchrun -m asga_deploy ...`) runs the `asga` command line."""

from .cli import main

if __name__ == "__main__":
    main()
