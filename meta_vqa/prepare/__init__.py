"""Dataset builders: the only layer that reads raw data (VQA v2, COCO images, the authors' files)."""
