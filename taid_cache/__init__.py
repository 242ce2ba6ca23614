"""taid-cache: offline teacher top-k caching and TAID distillation."""
