"""Raw layouts -> TFRecords -> tf.data batches."""
