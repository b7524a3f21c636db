"""Data: remote files (one download helper), the book's datasets, splits, tokenizers and loaders."""
