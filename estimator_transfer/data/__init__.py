"""Input pipelines: TFRecords and image folders -> (features, labels)."""
