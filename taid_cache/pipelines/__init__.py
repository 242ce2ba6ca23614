"""The project's jobs, each one function over a config dataclass: the CLI only parses options into them."""
