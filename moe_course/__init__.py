"""moe_course: the tested building blocks of the Mixture-of-Experts course.

Experts are doctors; the router is the GP who sends each patient to the right
specialist. The model core is the flat files, in reading order (the code the
lessons show); everything else is in a folder named for its role.

    device       get_device(), seed_everything()
    experts      FeedForward: one doctor, the transformer's MLP block; Experts: E doctors, stacked weights
    gating       softmax_gate(), SoftmaxGate: the GP weighs every doctor (lesson 03)
    mixture      DenseMixture: every expert on every patient (lesson 03); RoutedMixture: only the top k (lesson 04)
    routing      the GP: top_k_routing(), switch_routing(), noisy_top_k_routing(), mixtral_routing(), sigmoid_routing(),
                 expert_bias_update(), expert_choice_routing(), capacity_mask()
    losses       load_balancing_loss(), router_z_loss(), importance_loss(): keep every doctor busy
    dispatch     sort_dispatch(): send tokens to their experts, weigh and add up what comes back
    moe          MoEConfig, MoELayer: a router in front of E experts, returns MoEOutput; upcycle()
    models       ClinicMoE: embed, one MoE layer, classify (the clinic lessons)
    attention    CausalSelfAttention, causal_mask(), rotary_embedding(): tokens talk to each other
    transformer  GPT, GPTConfig: a dense or Switch character GPT
    flops        count_parameters(), param_count(), flops_per_token(): every count of parameters and FLOPs
    show         show_source(): read the package's code inside a lesson
    train        ``python -m moe_course.train``: the same as ``moe-train`` (training/cli.py)

    fast/        the same computations arranged for speed (hand-written backward, threads, grouped matmuls)
    data/        the clinic's patients and the language corpus
    training/    train(), TrainConfig: one loop for every model; LMTask; the ``moe-train`` command
    experiments/ the lessons' experiments over seeds, in worker processes
    analysis/    measurements of trained models: specialisation, load, routing per layer
    figures/     plots and widgets
    bench/       ``moe-bench``: fair (paired) timings and peak memory
    variants/    other MoE designs: Soft MoE, adaptive computation (lesson 09)
    distributed/ expert parallelism across processes, torchrun training (lesson 09)
    course/      ``moe-course`` (or ``python -m moe_course``): the learner's command
    checks/      check("N.M", answer): the hidden tests of the exercises
    exercises/   ``moe-exercises build``: exercises/ generated from solutions/

Arrows run one way: figures and experiments → training → models → core → fast.

Shape legend, used everywhere: B batch, T time, D model width, F hidden width,
E experts, K top-k, C capacity, N = B·T tokens.
"""

__version__ = "0.1.0"
__all__ = ["get_device", "seed_everything", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that `python -m moe_course progress` answers without loading torch.
    if name in ("get_device", "seed_everything"):
        from . import device

        return getattr(device, name)
    raise AttributeError(f"module 'moe_course' has no attribute {name!r}")
