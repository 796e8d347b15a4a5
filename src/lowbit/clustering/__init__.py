"""Weight sharing: per-layer k-means clustering of weights."""
