"""What users import; re-exported by ``aiki``."""
