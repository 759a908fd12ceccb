"""The peers suite (`boostserve bench --suite peers`): boostserve against the servers users pick.

`runner` runs it, `envs` installs each peer into its own venv on demand, `protocol` builds the
requests and reads the answers, `servers` holds the peer servers themselves (run in those venvs),
`report` renders the table and plot. Optional: the peers are never installed by a plain
`pip install` of boostserve nor run by the default benchmark or CI.
"""
