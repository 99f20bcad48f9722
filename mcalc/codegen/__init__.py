"""Code generation (layers 4–5): batch plans and backends."""
