"""Data: sources -> tokenizer and token shards (prepare), the dataset on disk (dataset), batches (loader)."""
