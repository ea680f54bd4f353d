"""`nft train`: one training run (run.py) made of rollout.py, update.py, checkpoint.py, seeds.py and engines.py."""
