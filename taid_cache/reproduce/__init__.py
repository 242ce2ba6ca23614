"""The embedded default: a corpus, tokenizer and Llama models built from the Python standard library."""
