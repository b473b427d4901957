"""What every stage and the pipeline use: errors, atomic writes, paths and URIs, redaction, code versions."""
