"""The four stages (download, preprocess, train, evaluate) as plain functions with typed inputs and outputs.

Nothing here starts Ray or reads the config file; `pipeline/` does, and hands each stage its own settings.
"""
