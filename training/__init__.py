"""flexmoe_training: data-local FlexOlmo training on DeepSpeed (installed from training/)."""
