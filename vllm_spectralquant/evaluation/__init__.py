"""Quality measurements through a running vLLM server (OpenAI API): perplexity, greedy agreement, needles."""
