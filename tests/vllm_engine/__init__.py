"""Tests of fastsafe's vLLM adapter against a real vLLM engine (run in .venv-vllm; skipped without vLLM)."""
