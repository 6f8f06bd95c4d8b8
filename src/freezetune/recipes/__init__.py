"""Named fine-tuning recipes and ``freezetune sweep``, which runs several and keeps the evidence."""
