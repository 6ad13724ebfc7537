"""Usage records: the row written per request, the writer, the rollups."""
