"""Benchmarks for boostserve: offline policy curves, in-process engine throughput, HTTP load.

Everything here runs in the *serving* environment (numpy, Pillow, ONNX Runtime, optionally
`onnx`, `httpx`, `matplotlib`): no torch and no `models/`, so the numbers describe exactly what
a deployment would run. Entry point: `boostserve bench` (`bench.commands.bench`).
"""
