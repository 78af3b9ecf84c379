"""The feature store: the task's pure work, the writer, the reader, feature statistics."""
