"""Synthetic data, apart from the core path: procedural ISIC-2017-layout datasets (`generator`) and the
demo's shard folders (`demo_data`). Nothing in the training path depends on it except the trainer's
fallback to the demo shards when no `--train/--val` is given."""
