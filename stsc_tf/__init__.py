"""stsc_tf: Spatio-Temporal Structure Consistency for semi-supervised medical image classification (Keras 3)."""

__version__ = "0.1.0"
