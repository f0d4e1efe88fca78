"""Beyond one machine: expert parallelism across processes (lesson 09).

Referrals between hospitals: every process (rank) keeps a copy of the GP (the
router and every dense part of the model) but only E/W of the doctors; a
token travels to its doctor's rank and its answer travels back, in two
all-to-all exchanges. Modules, in reading order:

    group      init_process_group(), require_process_group(), same_on_every_rank(): the ranks and their guards
    exchange   all_to_all() (differentiable), exchange_counts(), exchange_matrix(), bytes_per_token()
    layer      ExpertParallelMoE: an MoELayer whose experts are spread over the ranks; shard_moe_layers()
    grads      all_reduce_replicated_grads(), clip_grad_norm_(), check_replicas_in_sync()
    launch     run_on_processes(): run a module function on W processes and get the results back
    verify     compare_with_one_process(): the distributed layer against one MoELayer, every gradient
    train      `torchrun ... -m moe_course.distributed.train`: the Switch LM, data + expert parallel
    traffic    record_traffic(): who sent how many tokens to whom, per step, from a real run

Lesson 09's other layers, Soft MoE and adaptive computation, need no process
group: they are in ``moe_course.variants``.

Nothing here is imported by ``import moe_course``; torch.distributed is only
needed once you import a module of this folder that uses it.
"""

from .group import init_process_group

__all__ = ["init_process_group"]
