"""Where images live: the object store (a folder or S3), uploads with their manifests, and their validation."""
