"""Services of the run as jobs: the service job (runner.py: vLLM through jobs/vllm, or the reward server), the reward server, server process helpers."""
