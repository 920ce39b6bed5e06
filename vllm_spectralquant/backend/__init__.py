"""The vLLM attention backend (imports vLLM; nothing else in the package does)."""
