"""The STSC model and the networks it trains.

    from stsc_tf.models import STSCModel, Term, register_backbone, with_relation_output
"""

from stsc_tf.models.backbones import register_backbone, registered_backbones, with_relation_output
from stsc_tf.models.layers import FusedBatchNormalization, fuse_batchnorm
from stsc_tf.models.stsc import REQUIRED_KEYS, STSCModel, Step, Term

__all__ = ["FusedBatchNormalization", "REQUIRED_KEYS", "STSCModel", "Step", "Term", "fuse_batchnorm",
           "register_backbone", "registered_backbones", "with_relation_output"]
