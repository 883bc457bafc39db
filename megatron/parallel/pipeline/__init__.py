"""Pipeline parallelism on ``torch.distributed.pipelining``: a stage's share of the model
(:mod:`.stage_model`) and the schedule runner (:mod:`.runner`); the layers of each stage are planned in
``megatron.config.pipeline_layout``."""
