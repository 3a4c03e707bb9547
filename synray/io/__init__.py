"""Storage URIs (local or S3), Parquet shards and dataset manifests."""
