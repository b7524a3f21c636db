"""Building blocks shared by every model: attention, positions, norms, feed-forward layers."""
