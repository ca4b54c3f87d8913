"""Run configs (ml_collections `get_config()` files) for `train.py --config configs/<name>.py`."""
