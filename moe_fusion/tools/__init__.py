"""Command-line tools behind ``moe-fusion``: one module per subcommand."""
