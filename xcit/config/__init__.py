"""The training config: typed keys with defaults, MindCV recipe files, option parsing."""
