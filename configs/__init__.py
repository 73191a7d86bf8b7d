"""The Hydra config tree, a package so that the wheel installs it as `conformer.configs`."""
