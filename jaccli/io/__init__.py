"""Everything that touches files: model and data loaders, hashes, results files."""
