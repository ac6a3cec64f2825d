"""Data tools: download the published shards, rebuild them from documents, make a synthetic corpus, inspect.

Each module here is also a command (`python data/<name>.py --help`); see data/README.md.
"""
