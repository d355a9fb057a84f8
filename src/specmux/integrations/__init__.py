"""specmux inside other serving engines (vLLM: :mod:`specmux.integrations.vllm`)."""
