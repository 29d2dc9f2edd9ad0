"""Runtime: KV cache, sampling, generation, tokenizer and chat."""
