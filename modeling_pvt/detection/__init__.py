"""Object detection on PvtBackbone: data, augmentation, evaluation and detector construction."""
