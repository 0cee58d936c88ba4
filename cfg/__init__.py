"""Default configuration and recipes (installed as yolo_prune.cfg)."""
