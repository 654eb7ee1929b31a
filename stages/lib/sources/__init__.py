"""The data sources of the download stage, one module each (no logic here: pipeline.code_files
leaves `__init__.py` files out of the code deps)."""
