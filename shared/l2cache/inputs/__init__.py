"""What a chunk is computed from: its segmentation (CloudVolume) and PCG's graph."""
