"""Benchmarks: `serve` load-tests an OpenAI-compatible server over HTTP (serve.py);
`throughput` measures the offline engine (throughput.py)."""
