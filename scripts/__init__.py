"""The command-line scripts, installed as `modeling_pvt.scripts` for the console entry points of pyproject.toml."""
