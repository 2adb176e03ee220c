"""Training: the DeepSpeed loop over the packed shards (``train``), the checkpoint stage around it, and the
sample world's own CLIP scorer and captioner trainers."""
