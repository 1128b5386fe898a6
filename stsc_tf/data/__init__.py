"""Data: raw layouts -> TFRecords (`convert`), the record pipelines (`pipeline`), STSC batches from arrays (`batches`).

Kept free of imports: the converter's worker processes import `stsc_tf.data.images`, which must not pull TensorFlow.
"""
