"""ABM training (issue 4): ``python -m training --help``."""
