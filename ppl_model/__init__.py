"""PPL: Panoptic Patch Learning detector of AI-generated images (model side)."""
