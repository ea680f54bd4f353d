"""Data: the synthetic task (synthetic.py), prompts, the local tokenizer, the benchmark registry and hub loaders."""
