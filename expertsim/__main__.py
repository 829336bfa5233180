"""`python -m expertsim ...`: the same command as `expertsim ...`."""
from expertsim.cli import main

if __name__ == "__main__":
    main()
