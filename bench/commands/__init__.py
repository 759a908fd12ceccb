"""`boostserve bench` subcommand (see bench.commands.bench)."""
