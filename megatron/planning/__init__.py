"""Planning without training: the dry run (parameters, FLOPs, memory per GPU), model statistics, the precision probe."""
