"""FID as the reference protocol computes it: image sources, the Inception detector, statistics."""
