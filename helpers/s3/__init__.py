"""S3 access: URLs, options and filesystems (storage), transient failures retried (retry), batch
GETs by presigned URL (presigned), the embedded server (server), and a counting, fault-injecting
proxy (proxy)."""
